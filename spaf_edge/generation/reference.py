"""PyTorch reference of SpAF decoding (DESIGN §4): draft -> verify -> accept -> commit.

Batch 1 only (asserted). The acceptance rule is :mod:`spaf_edge.sampling`, shared with
the ONNX Runtime engine. State between steps: committed tokens ``x_0 .. x_T``; both KV
caches hold positions ``0 .. T-1``; ``x_T`` is pending.

An attending adapter keeps a KV cache of its own, exact up to its length. The first
draft of a step (re)computes the positions that became exact since the last one (their
cutoff and previous top states come from the verify pass, kept as ``adapter_rows``) and
the pending token's; later drafts of the chain append drafted entries, which commit
drops again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from spaf_edge.config import validate_drafting
from spaf_edge.errors import ContextLengthError
from spaf_edge.generation.kv_cache import StackKVCache
from spaf_edge.model import SpAFModel
from spaf_edge.sampling import SamplingParams, accept, choose, draft_distribution, logits_to_probs, softmax
from spaf_edge.stats import GenerationStats


@dataclass
class DecodeState:
    tokens: list[int]  # committed x_0 .. x_T
    lower: StackKVCache
    upper: StackKVCache
    top: torch.Tensor | None = None  # exact top state of position T-1: [1, 1, H] (None when T == 0)
    hidden: torch.Tensor | None = None  # exact cutoff state of position T-1: [1, 1, H] (None when T == 0)
    top2: torch.Tensor | None = None  # exact top state of position T-2: [1, 1, H] (None when T < 2)
    adapter: StackKVCache | None = None  # an attending adapter's cache: exact entries 0 .. length-1
    # (h(t), f(t-1)), [1, 1, H] each, for t = adapter.length .. T-1: exact states not yet in the adapter cache
    adapter_rows: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return self.tokens[-1]

    @property
    def position(self) -> int:
        """T: the position of the pending token (= valid cache length)."""
        return len(self.tokens) - 1


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)  # d_1 .. d_D
    probs: list[np.ndarray] = field(default_factory=list)  # q_j over the full vocabulary
    exact_hidden: list[torch.Tensor] = field(default_factory=list)  # h(T .. T+e-1): [1, 1, H] each
    verified_top: torch.Tensor | None = None  # top states of T .. T+D from the verify pass: [1, D+1, H]
    verified_hidden: torch.Tensor | None = None  # cutoff states of T .. T+D: [1, D+1, H]


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    stats: GenerationStats
    text: str | None = None


def check_context(prompt_length: int, max_new_tokens: int, max_context: int) -> None:
    if prompt_length < 1:
        raise ContextLengthError("The prompt is empty; give at least one token.")
    if max_new_tokens < 1:
        raise ContextLengthError(f"max_new_tokens={max_new_tokens}: ask for at least 1 new token.")
    if prompt_length + max_new_tokens > max_context:
        raise ContextLengthError(
            f"Prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_length + max_new_tokens} exceeds the context of {max_context} tokens. "
            "Shorten the prompt or lower max_new_tokens."
        )


@torch.no_grad()
def prefill(model: SpAFModel, prompt: Sequence[int], max_length: int) -> DecodeState:
    """Run both stacks on ``prompt[:-1]``; the last prompt token becomes pending."""
    state = DecodeState(
        tokens=list(prompt),
        lower=model.new_cache(model.lower_layer_ids(), max_length),
        upper=model.new_cache(model.upper_layer_ids(), max_length),
        adapter=model.new_adapter_cache(max_length),
    )
    if len(prompt) > 1:
        ids = torch.tensor([list(prompt[:-1])], device=model.base_device)  # [1, P-1]
        hidden = model.run_layers(model.embed(ids), state.lower)
        tops = model.top_state(model.run_layers(hidden, state.upper))  # [1, P-1, H]
        state.top, state.hidden = tops[:, -1:], hidden[:, -1:]
        state.top2 = tops[:, -2:-1] if tops.shape[1] > 1 else None
        if state.adapter is not None:
            model.adapt(hidden, prev_top=torch.nn.functional.pad(tops[:, :-1], (0, 0, 1, 0)), cache=state.adapter)
    return state


def _draft_distribution(
    model: SpAFModel, logits: torch.Tensor, params: SamplingParams, vocab_size: int
) -> np.ndarray | None:
    """Processed draft distribution over the full vocabulary from draft-vocab logits [V_d];
    None for NaN/inf logits (:func:`spaf_edge.sampling.draft_distribution`)."""
    draft_vocab = model.draft_vocab.cpu().numpy() if model.draft_vocab.numel() else None
    return draft_distribution(logits.float().cpu().numpy(), params, draft_vocab, vocab_size)


@torch.no_grad()
def spaf_draft(
    model: SpAFModel,
    state: DecodeState,
    num_drafts: int,
    serial_parallel_transition: int,
    params: SamplingParams,
    rng: np.random.Generator,
    stop_threshold: float | None = None,
) -> Draft:
    """Serial drafts through the lower stack, then aligned drafts through the AlignmentHead.

    Each step's adapter also reads the top state of the position before: exact for the
    first draft (from the last verify pass), then the previous step's drafted top state.
    With ``serial_parallel_transition`` 0 every draft is aligned: the chain starts at ``T-1``,
    whose exact cutoff state the last verify pass left; the adapter on it (reading ``f(T-2)``)
    gives the drafted top state the first draft reads, as in the training rollout's first step.
    With no position before ``T`` the first draft is serial.
    """
    draft = Draft()
    vocab_size = model.base.config.vocab_size
    token = state.pending
    hidden_bar = state.hidden  # h̄ of the newest drafted position (first: the exact h(T-1)): [1, 1, H]
    prev_top = state.top  # f̄ of the position before it: [1, 1, H] or None
    serial = serial_parallel_transition if state.hidden is not None else max(1, serial_parallel_transition)
    if serial == 0 and num_drafts > 0:
        prev_top = _start_chain_before(model, state)
    for j in range(1, num_drafts + 1):
        if j <= serial:
            ids = torch.tensor([[token]], device=model.base_device)
            hidden_bar = model.run_layers(model.embed(ids), state.lower)  # exact h(T+j-1)
            draft.exact_hidden.append(hidden_bar)
        else:
            ids = torch.tensor([[token]], device=model.base_device)
            hidden_bar = model.align(ids, hidden_bar)  # pseudo ĥ(T+j-1)
        if state.adapter is None:
            logits, prev_top = model.draft_step(hidden_bar, prev_top=prev_top)
        else:  # the first draft also (re)computes the exact rows queued at commit
            row = (hidden_bar, prev_top if prev_top is not None else torch.zeros_like(hidden_bar))
            logits, prev_top = _adapter_step(model, state, (_take_queue(state) if j == 1 else []) + [row])
        logits = logits[0, -1]  # [V_d]
        q = _draft_distribution(model, logits, params, vocab_size)
        if q is None:  # NaN/inf logits (broken drafter weights): nothing to draw a draft from
            break
        if stop_threshold is not None:
            confidence = q.max() if not params.greedy else softmax(logits.float().cpu().numpy()).max()
            if confidence < stop_threshold:
                break
        token = choose(q, params, rng)
        draft.tokens.append(token)
        draft.probs.append(q)
    return draft


def _start_chain_before(model: SpAFModel, state: DecodeState) -> torch.Tensor:
    """The drafted top state of ``T-1`` from its exact states, ``final_norm(a(h(T-1), f(T-2)))``. [1, 1, H]

    An attending adapter computes it with its queued rows, which end at ``T-1`` (re-queued
    from the cache when they are empty), so that entry stays exact.
    """
    before = state.top2 if state.top2 is not None else torch.zeros_like(state.hidden)
    if state.adapter is None:
        return model.draft_step(state.hidden, prev_top=before)[1]
    if not state.adapter_rows:
        state.adapter.rewind_to(state.adapter.length - 1)
        state.adapter_rows = [(state.hidden, before)]
    return _adapter_step(model, state, _take_queue(state))[1]


def _take_queue(state: DecodeState) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The exact (h, f) rows queued for an attending adapter since its last first draft; the queue empties."""
    queued, state.adapter_rows = state.adapter_rows, []
    return queued


def _adapter_step(
    model: SpAFModel, state: DecodeState, rows: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """An attending adapter on (h, f) rows at its cache's next positions. -> logits [1, S, V_d], last top [1, 1, H]"""
    hidden_rows = torch.cat([h for h, _ in rows], dim=1)  # [1, S, H]
    prev_rows = torch.cat([f for _, f in rows], dim=1)  # [1, S, H]
    logits, tops = model.draft_step(hidden_rows, prev_top=prev_rows, offset=state.adapter.length, cache=state.adapter)
    return logits, tops[:, -1:]


@torch.no_grad()
def spaf_verify(model: SpAFModel, state: DecodeState, draft: Draft) -> np.ndarray:
    """One batched target pass over positions ``T .. T+D``. Returns logits [D+1, V] (float32)."""
    sequence = [state.pending] + draft.tokens
    exact = len(draft.exact_hidden)
    pieces = list(draft.exact_hidden)
    if exact < len(sequence):
        ids = torch.tensor([sequence[exact:]], device=model.base_device)  # [1, D+1-e]
        pieces.append(model.run_layers(model.embed(ids), state.lower))
    hidden = torch.cat(pieces, dim=1)  # [1, D+1, H]
    draft.verified_hidden = hidden
    draft.verified_top = model.top_state(model.run_layers(hidden, state.upper))
    return model.lm_head_rows(draft.verified_top)[0].float().cpu().numpy()


def commit(state: DecodeState, draft: Draft, num_accepted: int, bonus: int) -> list[int]:
    """Append the accepted drafts and the bonus; cut both caches back to the valid length.

    Follows :func:`spaf_verify` on the same draft, whose states become the exact ones of ``T+n``.
    """
    new = draft.tokens[:num_accepted] + [bonus]
    valid = state.position + num_accepted + 1  # positions T .. T+n now hold accepted tokens
    before = state.top if state.top is not None else torch.zeros_like(draft.verified_top[:, :1])  # f(T-1)
    previous = torch.cat([before, draft.verified_top], dim=1)  # f(T-1 .. T+D): the top state before each row
    if state.adapter is not None:
        # Entries past T are drafted, and so is T's after an aligned first draft; exact from there on:
        # positions .. T+n, each reading the top state before it.
        first_exact = 1 if draft.exact_hidden else 0
        state.adapter.rewind_to(min(state.adapter.length, state.position + first_exact))
        for position in range(state.adapter.length + len(state.adapter_rows), valid):
            row = position - state.position
            state.adapter_rows.append((draft.verified_hidden[:, row:row + 1], previous[:, row:row + 1]))
    state.tokens.extend(new)
    state.top2 = previous[:, num_accepted:num_accepted + 1]  # f(T+n-1)
    state.top = draft.verified_top[:, num_accepted:num_accepted + 1]  # top state of T+n, before the bonus
    state.hidden = draft.verified_hidden[:, num_accepted:num_accepted + 1]  # its cutoff state
    state.lower.rewind_to(valid)
    state.upper.rewind_to(valid)
    return new


@torch.no_grad()
def spaf_generate(
    model: SpAFModel,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_draft_tokens: int | None = None,
    serial_parallel_transition: int | None = None,
    draft_stop_threshold: float | None = None,
    eos_token_ids: Sequence[int] | None = None,
    max_context: int | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens; settings default to ``model.config``'s."""
    config = model.config
    params = SamplingParams(
        temperature=config.temperature if temperature is None else temperature,
        top_k=config.top_k if top_k is None else top_k,
        top_p=config.top_p if top_p is None else top_p,
    )
    if num_draft_tokens is None:
        num_draft_tokens = config.num_draft_tokens
    transition = serial_parallel_transition
    if transition is None:
        transition = min(config.serial_parallel_transition, num_draft_tokens)
    stop_threshold = draft_stop_threshold if draft_stop_threshold is not None else config.draft_stop_threshold
    validate_drafting(num_draft_tokens, transition, stop_threshold)
    prompt = _as_token_list(input_ids)
    max_context = max_context or model.max_context
    check_context(len(prompt), max_new_tokens, max_context)
    eos = set(eos_token_ids if eos_token_ids is not None else default_eos_ids(model))
    rng = np.random.default_rng(seed)

    stats = GenerationStats(prompt_tokens=len(prompt))
    start = time.perf_counter()
    state = prefill(model, prompt, len(prompt) + max_new_tokens)
    stats.prefill_seconds = time.perf_counter() - start
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        budget = min(num_draft_tokens, max_new_tokens - len(generated) - 1)
        draft = spaf_draft(model, state, budget, transition, params, rng, stop_threshold)
        target_probs = logits_to_probs(spaf_verify(model, state, draft), params)
        num_accepted, bonus = accept(draft.tokens, draft.probs, target_probs, params, rng)
        new = commit(state, draft, num_accepted, bonus)
        stats.record(len(draft.tokens), num_accepted)
        new, finished = _cut_at_eos(new, eos)
        generated.extend(new)
        if not stats.first_token_seconds:
            stats.first_token_seconds = time.perf_counter() - start
        if on_tokens is not None:
            on_tokens(new)
        if finished:
            break
    stats.new_tokens = len(generated)
    stats.wall_seconds = time.perf_counter() - start
    return GenerationResult(tokens=generated, stats=stats)


def default_eos_ids(model: SpAFModel) -> list[int]:
    """EOS ids from the base's generation config, config and tokenizer."""
    ids: set[int] = set()
    sources = [getattr(model.base, "generation_config", None), model.base.config]
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or [])
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return sorted(ids)


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1], True
    return tokens, False


def _as_token_list(input_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            assert input_ids.shape[0] == 1, "spaf_generate is batch-1: pass one sequence"
            input_ids = input_ids[0]
        return [int(t) for t in input_ids.tolist()]
    return [int(t) for t in input_ids]
