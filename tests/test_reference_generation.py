"""The PyTorch reference decoder is lossless: greedy SpAF == HF greedy, token for token.

SpAF modules are random (untrained) unless a test says otherwise: losslessness must not
depend on draft quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_spaf

from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError, ContextLengthError
from spaf_edge.core.sampling import SamplingParams, logits_to_probs
from spaf_edge.decoding.loop import DecodeSettings, Proposal
from spaf_edge.decoding.tree import accept_tree
from spaf_edge.generation.reference import TorchBackend, spaf_generate
from spaf_edge.model import SpAFModel

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = [(1, 1), (3, 1), (4, 2), (5, 5), (6, 3)]  # (num_draft_tokens, serial_parallel_transition)
PROMPTS = ([1, 7, 19, 42, 5], [3, 90, 11])
NEW_TOKENS = 40


def hf_greedy(base, prompt: list[int], max_new_tokens: int, eos: int | list[int] | None = None) -> list[int]:
    """Transformers' own greedy decoding (fp32, KV cache); ``eos=None`` disables stopping."""
    with torch.no_grad():
        out = base.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt):].tolist()


def greedy(model, prompt, max_new_tokens=NEW_TOKENS, **kwargs):
    """SpAF greedy, SpAF drafting alone unless ``proposers`` says otherwise (these tests are of its drafts)."""
    kwargs.setdefault("eos_token_ids", [])
    kwargs.setdefault("proposers", "spaf")
    return spaf_generate(model, prompt, max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)


def make_upper_identity(model: SpAFModel) -> None:
    """Zero the residual writes of layers k..L-1, so the full model equals early exit at k exactly."""
    layers = model.arch.layers(model.base)
    with torch.no_grad():
        for index in model.upper_layer_ids():
            layers[index].self_attn.o_proj.weight.zero_()
            layers[index].mlp.down_proj.weight.zero_()


def accepted_per_step(model, prompt, **kwargs):
    """Greedy result and the number of drafts accepted at each verify step (from the stream)."""
    steps: list[int] = []
    result = greedy(model, prompt, on_tokens=lambda new: steps.append(len(new) - 1), **kwargs)
    return result, steps


@pytest.mark.parametrize("num_drafts,transition", PAIRS)
def test_greedy_equals_hf_generate(model_type, num_drafts, transition):
    model = make_tiny_spaf(model_type)
    for prompt in PROMPTS:
        expected = hf_greedy(model.base, prompt, NEW_TOKENS)
        assert len(expected) == NEW_TOKENS
        result = greedy(model, prompt, num_draft_tokens=num_drafts, serial_parallel_transition=transition)
        assert result.tokens == expected
        assert result.stats.new_tokens == NEW_TOKENS
        assert result.stats.verify_steps <= NEW_TOKENS


@pytest.mark.parametrize("num_drafts,transition", [(5, 5), (4, 2), (6, 3)])
def test_mostly_accepted_drafts_stay_lossless(num_drafts, transition):
    """Upper layers made identity: serial drafts equal the target, so long runs are accepted."""
    exact = make_tiny_spaf("llama", randomize=False)  # untrained adapter = plain early exit
    make_upper_identity(exact)
    prompt = PROMPTS[0]
    expected = hf_greedy(exact.base, prompt, NEW_TOKENS)
    result, steps = accepted_per_step(exact, prompt, num_draft_tokens=num_drafts,
                                      serial_parallel_transition=transition)
    assert result.tokens == expected
    assert result.stats.acceptance_by_position[:transition] == [1.0] * transition
    assert all(accepted >= transition for accepted in steps[:-1])  # the last step may be cut by the budget
    assert result.stats.tau > transition

    # Random adapters on the same identity-upper base: mixed runs, some fully accepted, some cut.
    mixed = make_tiny_spaf("llama", seed=4)
    make_upper_identity(mixed)
    expected = hf_greedy(mixed.base, prompt, 60)
    result, steps = accepted_per_step(mixed, prompt, max_new_tokens=60, num_draft_tokens=num_drafts,
                                      serial_parallel_transition=transition)
    assert result.tokens == expected
    assert len(set(steps)) >= 3, steps  # runs cut at several different positions
    assert max(steps) >= 2


def test_all_serial_drafts_fully_accepted_give_n_plus_one_tokens_per_step():
    model = make_tiny_spaf("qwen2", randomize=False)
    make_upper_identity(model)
    result = greedy(model, PROMPTS[1], max_new_tokens=36, num_draft_tokens=5, serial_parallel_transition=5)
    assert result.tokens == hf_greedy(model.base, PROMPTS[1], 36)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.verify_steps == 6  # 36 tokens = 6 steps of 5 drafts + 1 bonus


@pytest.mark.parametrize("threshold", [0.15, 0.3, 0.999])
def test_draft_stop_threshold_stays_lossless(threshold):
    model = make_tiny_spaf("llama", seed=2, initializer_range=0.3)  # peaked: top draft probs ~0.1-0.4
    make_upper_identity(model)
    prompt = PROMPTS[0]
    result = greedy(model, prompt, num_draft_tokens=5, serial_parallel_transition=2, draft_stop_threshold=threshold)
    assert result.tokens == hf_greedy(model.base, prompt, NEW_TOKENS)
    drafted = sum(result.stats.drafted)
    assert drafted < 5 * result.stats.verify_steps  # drafting stopped early at least once
    if threshold == 0.999:
        assert result.stats.tau == 1.0  # no confident draft: plain decoding, one token per pass
    else:
        assert drafted > 0


def test_min_drafts_keeps_doubtful_first_drafts_and_stays_lossless():
    """Below the threshold a chain keeps its first ``min_drafts`` drafts and stops there."""
    model = make_tiny_spaf("llama", seed=2, initializer_range=0.3)
    make_upper_identity(model)
    prompt = PROMPTS[0]
    for kept in (1, 2):
        result = greedy(model, prompt, num_draft_tokens=5, serial_parallel_transition=0, draft_stop_threshold=0.999,
                        min_drafts=kept, proposers="spaf")
        assert result.tokens == hf_greedy(model.base, prompt, NEW_TOKENS)
        # no draft is confident: each step drafts the kept ones and no more (the last steps may have less room)
        drafted = result.stats.drafted
        assert len(drafted) == kept and drafted[0] >= result.stats.verify_steps - kept, drafted
    with pytest.raises(ConfigError, match="min_drafts"):
        greedy(model, prompt, min_drafts=-1)


def test_eos_stops_at_first_eos_inclusive_like_hf(model_type):
    model = make_tiny_spaf(model_type)
    prompt = PROMPTS[0]
    free = hf_greedy(model.base, prompt, NEW_TOKENS)
    eos = free[12]
    first = free.index(eos)
    expected = hf_greedy(model.base, prompt, NEW_TOKENS, eos=eos)
    assert expected == free[: first + 1]
    for num_drafts, transition in [(1, 1), (5, 2), (6, 6)]:
        result = greedy(model, prompt, num_draft_tokens=num_drafts, serial_parallel_transition=transition,
                        eos_token_ids=[eos])
        assert result.tokens == expected
    other = free[first + 1] if free[first + 1] != eos else free[0]
    result = greedy(model, prompt, eos_token_ids=[other, eos])
    assert result.tokens == hf_greedy(model.base, prompt, NEW_TOKENS, eos=[other, eos])


def test_eos_inside_an_accepted_run_cuts_the_run():
    model = make_tiny_spaf("llama", randomize=False)
    make_upper_identity(model)
    prompt = PROMPTS[0]
    free = hf_greedy(model.base, prompt, NEW_TOKENS)
    eos = free[9]
    result = greedy(model, prompt, num_draft_tokens=5, serial_parallel_transition=5, eos_token_ids=[eos])
    assert result.tokens == free[: free.index(eos) + 1]
    assert result.stats.new_tokens == len(result.tokens)


def test_default_eos_comes_from_the_model():
    model = make_tiny_spaf("llama")
    prompt = PROMPTS[0]
    free = hf_greedy(model.base, prompt, NEW_TOKENS)
    model.base.generation_config.eos_token_id = free[7]
    result = spaf_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    assert result.tokens == free[: free.index(free[7]) + 1]


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 6, 7, 13])
def test_max_new_tokens_is_respected_exactly(max_new_tokens):
    model = make_tiny_spaf("llama", randomize=False)
    make_upper_identity(model)  # every draft accepted: the budget, not a rejection, ends each step
    prompt = PROMPTS[0]
    expected = hf_greedy(model.base, prompt, max_new_tokens)
    result = greedy(model, prompt, max_new_tokens=max_new_tokens, num_draft_tokens=5, serial_parallel_transition=5)
    assert result.tokens == expected
    assert len(result.tokens) == max_new_tokens == result.stats.new_tokens


def test_draft_vocabulary_stays_lossless(model_type):
    model = make_tiny_spaf(model_type, seed=5)
    make_upper_identity(model)
    prompt = PROMPTS[0]
    expected = hf_greedy(model.base, prompt, NEW_TOKENS)
    assert greedy(model, prompt, num_draft_tokens=4, serial_parallel_transition=2).stats.acceptance_rate > 0
    needed = sorted(set(expected))
    # No token the output needs can be drafted: every draft is rejected, the output is unchanged.
    model.set_draft_vocab(torch.tensor([t for t in range(96) if t not in needed]))
    disjoint = greedy(model, prompt, num_draft_tokens=4, serial_parallel_transition=2)
    assert disjoint.tokens == expected
    assert disjoint.stats.acceptance_rate == 0.0
    for vocab in (needed, needed[::2] + list(range(60, 96))):
        model.set_draft_vocab(torch.tensor(vocab))
        assert greedy(model, prompt, num_draft_tokens=4, serial_parallel_transition=2).tokens == expected


def test_streaming_and_tensor_prompt():
    model = make_tiny_spaf("llama")
    streamed: list[int] = []
    result = greedy(model, torch.tensor([PROMPTS[0]]), on_tokens=streamed.extend)
    assert streamed == result.tokens == hf_greedy(model.base, PROMPTS[0], NEW_TOKENS)
    assert result.stats.prompt_tokens == len(PROMPTS[0])


def test_context_overflow_is_refused():
    model = make_tiny_spaf("llama")  # max_position_embeddings = 128
    with pytest.raises(ContextLengthError, match="exceeds the context of 128"):
        greedy(model, list(range(1, 101)), max_new_tokens=29)
    with pytest.raises(ContextLengthError, match="exceeds the context of 64"):
        greedy(model, [1, 2, 3], max_new_tokens=62, max_context=64)
    with pytest.raises(ContextLengthError, match="empty"):
        greedy(model, [], max_new_tokens=4)
    with pytest.raises(ContextLengthError, match="at least 1"):
        greedy(model, [1, 2], max_new_tokens=0)
    prompt = [(7 * i) % 90 + 1 for i in range(100)]
    result = greedy(model, prompt, max_new_tokens=28)  # exactly fills the context
    assert result.tokens == hf_greedy(model.base, prompt, 28)


def test_bad_drafting_arguments_are_refused():
    model = make_tiny_spaf("llama")
    with pytest.raises(ConfigError, match="num_draft_tokens"):
        greedy(model, [1, 2], num_draft_tokens=0)
    with pytest.raises(ConfigError, match="serial_parallel_transition"):
        greedy(model, [1, 2], num_draft_tokens=2, serial_parallel_transition=3)
    with pytest.raises(ConfigError, match="top_p"):
        spaf_generate(model, [1, 2], temperature=1.0, top_p=0.0)


@pytest.mark.real_model
def test_default_model_greedy_equals_hf_generate(default_base):
    base, tokenizer = default_base
    from spaf_edge.prompts import encode_prompt

    model = SpAFModel(base, SpAFConfig(), tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.spaf_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    prompt = encode_prompt(tokenizer, "Give three tips for staying healthy.")
    expected = hf_greedy(base, prompt, 48)
    assert len(expected) == 48
    for num_drafts, transition in [(5, 2), (2, 2)]:
        result = greedy(model, prompt, max_new_tokens=48, num_draft_tokens=num_drafts,
                        serial_parallel_transition=transition)
        assert result.tokens == expected, (num_drafts, transition)


# ---- top-aware drafters -------------------------------------------------------
def fused_spaf(model_type: str = "llama", seed: int = 0, kind: str = "fused") -> SpAFModel:
    """A tiny SpAF model whose adapter reads the previous top state (random weights); ``kind``
    ``attention`` also attends over earlier positions, with a KV cache of its own."""
    return make_tiny_spaf(model_type, seed, spaf_config=SpAFConfig(cutoff_layer=2, adapter_kind=kind,
                                                                   adapter_dim_ratio=1.0))


@pytest.mark.parametrize("kind", ["fused", "attention"])
@pytest.mark.parametrize("num_drafts,transition", [(1, 1), (4, 1), (5, 2), (4, 0)])
def test_top_aware_adapter_greedy_equals_hf_generate(model_type, num_drafts, transition, kind):
    model = fused_spaf(model_type, kind=kind)
    for prompt in PROMPTS + ([9],):  # a one-token prompt: no prefill, the first top state is zeros
        expected = hf_greedy(model.base, prompt, NEW_TOKENS)
        result = greedy(model, prompt, num_draft_tokens=num_drafts, serial_parallel_transition=transition)
        assert result.tokens == expected


def start(model: SpAFModel, prompt: list[int], max_length: int) -> TorchBackend:
    backend = TorchBackend(model, max_length, frozenset())
    backend.prefill(prompt, reuse_cache=False, active=True)
    return backend


def step(backend: TorchBackend, drafts: int, transition: int, params: SamplingParams, rng) -> tuple[Proposal, int]:
    """One propose -> verify -> accept -> commit step, as the loop runs it."""
    proposal = backend.proposer.propose(drafts, DecodeSettings(params, drafts, transition, None, "spaf"), rng)
    path, bonus = accept_tree(proposal.tree, logits_to_probs(backend.verify(proposal), params), params, rng)
    backend.proposer.accepted(proposal, [0, *path])
    backend.commit(proposal, [0, *path], bonus)
    return proposal, len(path)


def probe(backend: TorchBackend, params: SamplingParams, rng) -> Proposal:
    """One serial draft from the kept state (undone by :func:`undo_probe`)."""
    return backend.proposer.propose(1, DecodeSettings(params, 1, 1, None, "spaf"), rng)


def undo_probe(backend: TorchBackend) -> None:
    backend.lower.rewind_to(backend.position)  # the probe's lower-stack step
    backend.serial_hidden.clear()


@torch.no_grad()
def test_fused_drafts_read_the_exact_top_state_after_a_rejection():
    """After commit the state's top state is the base's own, and the first draft uses it."""
    model = fused_spaf(seed=3)
    assert model.reads_top_state()
    params = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    state = start(model, PROMPTS[0], 64)
    rejected = 0
    for _ in range(6):
        draft, accepted = step(state, 4, 1, params, rng)
        rejected += accepted < len(draft.tokens)
        with torch.no_grad():
            hidden = model.base_features(torch.tensor([state.tokens]))
        fresh_top = hidden[-1][:, -2:-1]  # post-norm top state of position T-1
        torch.testing.assert_close(state.top, fresh_top, rtol=1e-4, atol=1e-5)
        # The next first draft is head(a(h(T), f(T-1))) from the exact states.
        expected_logits = model.draft_logits(hidden[2][:, -1:], prev_top=fresh_top)
        zeros_logits = model.draft_logits(hidden[2][:, -1:], prev_top=torch.zeros_like(fresh_top))
        assert not torch.allclose(expected_logits, zeros_logits)  # the top state matters to this kind
        next_draft = probe(state, params, rng)
        assert next_draft.tokens == [int(expected_logits[0, -1].argmax())]
        undo_probe(state)
    assert rejected > 0


# ---- an adapter that attends across positions ------------------------------------
@torch.no_grad()
def test_attention_adapter_cache_holds_exact_entries_after_commit():
    """After every commit the first draft's distribution equals the adapter on exact states only
    (the training path): drafted chain entries are dropped and newly exact positions recomputed."""
    model = fused_spaf(seed=3, kind="attention")
    params = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(0)
    state = start(model, PROMPTS[0], 80)
    calls = state.proposer.spaf.calls
    rejected = 0
    for index in range(8):
        draft, accepted = step(state, 4, index % 3, params, rng)  # s = 0, 1, 2
        rejected += accepted < len(draft.tokens)
        hidden = model.base_features(torch.tensor([state.tokens]))
        previous = torch.nn.functional.pad(hidden[-1][:, :-1], (0, 0, 1, 0))
        adapted = model.adapt(hidden[2], prev_top=previous, context=model.adapter_context(hidden[2], previous))
        expected = torch.softmax(model.lm_head_rows(model.top_state(adapted))[0, -1].double(), -1).numpy()
        length, rows = calls.adapter.length, list(calls.rows)
        first = probe(state, params, np.random.default_rng(1))
        np.testing.assert_allclose(first.tree.q(1), expected, atol=1e-6)
        undo_probe(state)
        calls.adapter.rewind_to(length)
        calls.rows = rows
    assert rejected > 0


@torch.no_grad()
def test_attention_training_path_is_the_decoding_path():
    """``adapt(..., context=...)`` at offset r equals the cached path with exact entries before each query
    and the query's own (drafted) input: the training approximation of a draft chain, position by position."""
    model = fused_spaf(seed=1, kind="attention")
    ids = torch.tensor([PROMPTS[0] + [4, 8, 15]])
    hidden = model.base_features(ids)
    exact, previous = hidden[2], torch.nn.functional.pad(hidden[-1][:, :-1], (0, 0, 1, 0))
    context = model.adapter_context(exact, previous)
    step = 2
    drafted = exact[:, step:] + 0.3 * torch.randn_like(exact[:, step:])  # stand-ins for pseudo states
    drafted_prev = previous[:, step:] + 0.3 * torch.randn_like(previous[:, step:])
    batched = model.adapt(drafted, prev_top=drafted_prev, offset=step, context=context)
    for index in range(drafted.shape[1]):
        position = step + index
        cache = model.new_adapter_cache(16)
        model.adapt(exact[:, :position], prev_top=previous[:, :position], cache=cache)  # exact entries 0 .. t-1
        one = model.adapt(drafted[:, index:index + 1], prev_top=drafted_prev[:, index:index + 1], offset=position,
                          cache=cache)
        torch.testing.assert_close(batched[:, index:index + 1], one, rtol=1e-5, atol=1e-6)
