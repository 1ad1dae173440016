"""The onnxruntime engine: lossless greedy, exact sampling, in-place KV caches, streaming, errors.

Tiny random models are exported with the real exporter (``export_model``); SpAF modules
are random unless a test says otherwise, so drafts are often rejected and every rollback
path runs. Hidden size 64 gives head_dim 16, which ORT's GroupQueryAttention requires.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_tiny_spaf, make_tiny_tokenizer
from test_reference_generation import make_upper_identity

from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import (
    ConfigError,
    ContextLengthError,
    ExportFormatError,
    ProviderUnavailableError,
)
from spaf_edge.core.io_names import EMBEDDINGS, LOWER_GRAPH, MANIFEST, UPPER_GRAPH
from spaf_edge.core.manifest import DIGEST_FIELD, content_digest
from spaf_edge.core.sampling import SamplingParams, logits_to_probs
from spaf_edge.core.stats import GenerationStats
from spaf_edge.decoding.loop import (
    DecodeResult,
    DecodeSettings,
    Proposal,
    TargetProbs,
    common_prefix,
)
from spaf_edge.exporters import export_model
from spaf_edge.generation.reference import spaf_generate
from spaf_edge.runtime.embeddings import EmbeddingTable
from spaf_edge.runtime.engine import Engine
from spaf_edge.runtime.graphs import Binding
from spaf_edge.runtime.precision_defaults import (
    OTHER,
    STOP_THRESHOLD_FLOORS,
    VNNI,
    cpu_kernels,
    precision_defaults,
)
from spaf_edge.runtime.rows import MAX_ROWS
from spaf_edge.runtime.stream import IncrementalDecoder
from spaf_edge.runtime.tokenizer import TextTokenizer
from spaf_edge.validation.end_to_end import base_greedy

pytestmark = pytest.mark.usefixtures("single_thread")

EXPORTABLE = dict(hidden_size=64)  # head_dim 16
PROMPTS = ([1, 7, 19, 42, 5], [3, 90, 11])
PAIRS = [(1, 1), (3, 1), (5, 2), (4, 4), (3, 0)]  # (num_draft_tokens, serial_parallel_transition)


def export(model, folder: Path, **kwargs) -> Path:
    return export_model(model, folder, progress=False, **kwargs)


def torch_greedy(model, prompt, max_new_tokens, eos, **drafting):
    return spaf_generate(model, prompt, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=eos, **drafting)


def edit_manifest(folder: Path, change) -> None:
    """Change the manifest's content and reseal its digest, as a (buggy) exporter would write it."""
    data = json.loads((folder / MANIFEST).read_text())
    change(data)
    data[DIGEST_FIELD] = content_digest(data)
    (folder / MANIFEST).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, export folder): random SpAF modules on a tiny Llama."""
    model = make_tiny_spaf("llama", **EXPORTABLE)
    return model, export(model, tmp_path_factory.mktemp("rt") / "export")


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_folder(tiny[1])


@pytest.fixture
def export_copy(tiny, tmp_path):
    """A private copy of the tiny export, for tests that damage it."""
    return Path(shutil.copytree(tiny[1], tmp_path / "export"))


# ---- lossless greedy ------------------------------------------------------
@pytest.mark.parametrize("num_drafts,transition", PAIRS)
def test_greedy_equals_pytorch_reference_and_base(tiny, engine, num_drafts, transition):
    model, _ = tiny
    eos = sorted(engine.eos)
    for prompt in PROMPTS:
        result = engine.generate(prompt, max_new_tokens=30, num_draft_tokens=num_drafts,
                                 serial_parallel_transition=transition)
        reference = torch_greedy(model, prompt, 30, eos, num_draft_tokens=num_drafts,
                                 serial_parallel_transition=transition)
        assert result.tokens == reference.tokens == base_greedy(model.base, prompt, 30, eos)
        assert result.stats.verify_steps == reference.stats.verify_steps  # same drafts accepted
        assert result.stats.accepted == reference.stats.accepted


def test_plain_greedy_mode_equals_spaf(engine):
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=25, mode="greedy")
        assert plain.tokens == engine.generate(prompt, max_new_tokens=25).tokens
        assert plain.stats.verify_steps == len(plain.tokens)  # one full pass per token, no drafts
        assert sum(plain.stats.drafted) == 0


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_greedy_lossless_on_other_architectures(model_type, tmp_path):
    model = make_tiny_spaf(model_type, **EXPORTABLE)
    engine = Engine.from_folder(export(model, tmp_path / "export"))
    eos = sorted(engine.eos)
    result = engine.generate(PROMPTS[0], max_new_tokens=24, num_draft_tokens=4, serial_parallel_transition=2)
    assert result.tokens == base_greedy(model.base, PROMPTS[0], 24, eos)


def test_high_acceptance_when_the_upper_layers_are_identity(tmp_path):
    """Untrained adapter (identity) + identity upper layers: serial drafts are the target's argmax."""
    model = make_tiny_spaf("llama", randomize=False, **EXPORTABLE)
    make_upper_identity(model)
    engine = Engine.from_folder(export(model, tmp_path / "export"))
    eos = sorted(engine.eos)
    prompt = PROMPTS[0]
    expected = base_greedy(model.base, prompt, 30, eos)
    all_serial = engine.generate(prompt, max_new_tokens=30, num_draft_tokens=4, serial_parallel_transition=4,
                                 proposers="spaf")
    assert all_serial.tokens == expected
    assert all_serial.stats.acceptance_rate == 1.0
    assert all_serial.stats.tau > 4.0
    mixed = engine.generate(prompt, max_new_tokens=30, num_draft_tokens=5, serial_parallel_transition=2,
                            proposers="spaf")
    assert mixed.tokens == expected
    assert mixed.stats.acceptance_by_position[:2] == [1.0, 1.0]
    reference = torch_greedy(model, prompt, 30, eos, num_draft_tokens=5, serial_parallel_transition=2,
                             proposers="spaf")
    assert mixed.stats.accepted == reference.stats.accepted


def test_draft_vocabulary_export_is_lossless(tmp_path):
    model = make_tiny_spaf("llama", **EXPORTABLE)
    model.set_draft_vocab(torch.arange(0, 96, 3))
    engine = Engine.from_folder(export(model, tmp_path / "export"))
    assert engine.decoder.proposer.spaf.calls.draft_vocab is not None and len(engine.decoder.proposer.spaf.calls.draft_vocab) == 32
    eos = sorted(engine.eos)
    result = engine.generate(PROMPTS[1], max_new_tokens=24, num_draft_tokens=3, serial_parallel_transition=1)
    reference = torch_greedy(model, PROMPTS[1], 24, eos, num_draft_tokens=3, serial_parallel_transition=1)
    assert result.tokens == reference.tokens == base_greedy(model.base, PROMPTS[1], 24, eos)
    assert result.stats.accepted == reference.stats.accepted
    sampled = engine.generate(PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=3)
    assert len(sampled.tokens) >= 1


@pytest.mark.parametrize("dtype, quantization", [("float16", None), ("float32", "int4")])
@pytest.mark.parametrize("kind", ["bottleneck", "attention"])
def test_spaf_equals_plain_greedy_of_the_same_fp16_or_quantized_export(dtype, quantization, kind, tmp_path):
    """Lossless against the export's own target model: fp16 rows of embeddings.bin, MatMulNBits layers
    (for the attention adapter also an fp16 / quantized KV cache and attention of its own)."""
    model = make_tiny_spaf("llama", spaf_config=SpAFConfig(cutoff_layer=2, adapter_kind=kind), **EXPORTABLE)
    model.set_draft_vocab(torch.arange(0, 96, 2))  # the private, prepacked LM-head layout
    engine = Engine.from_folder(export(model, tmp_path / "export", dtype=dtype, quantization=quantization,
                                       max_length=64))
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=16, mode="greedy").tokens
        for n, s in PAIRS:
            spaf = engine.generate(prompt, max_new_tokens=16, num_draft_tokens=n, serial_parallel_transition=s)
            assert spaf.tokens == plain, (prompt, n, s)


# ---- the KV caches --------------------------------------------------------
def test_cache_rows_after_rejections_equal_a_fresh_prefill(tiny):
    engine = Engine.from_folder(tiny[1])
    result = engine.generate(PROMPTS[0], max_new_tokens=20, num_draft_tokens=4, serial_parallel_transition=2)
    assert 0 < result.stats.acceptance_rate < 1  # drafts were rejected, so caches were rolled back
    valid = engine.decoder.position
    assert engine.decoder.lower.kv.length == engine.decoder.upper.kv.length == valid
    caches = (engine.decoder.lower.kv, engine.decoder.upper.kv)
    after = {(id(kv), layer): kv.rows(layer) for kv in caches for layer in kv.layers}
    engine.decoder.prefill(list(engine.decoder.tokens))  # recompute every committed position from scratch
    assert engine.decoder.position == valid
    for kv in caches:
        for layer in kv.layers:
            for got, fresh in zip(after[(id(kv), layer)], kv.rows(layer)):
                assert got.shape == fresh.shape == (1, 2, valid, 16)
                np.testing.assert_allclose(got, fresh, rtol=1e-4, atol=1e-5)


def test_kv_buffers_are_bound_in_place(engine):
    before = [value.data_ptr() for value in engine.decoder.lower.kv.keys + engine.decoder.upper.kv.values]
    engine.generate(PROMPTS[1], max_new_tokens=10)
    assert [value.data_ptr() for value in engine.decoder.lower.kv.keys + engine.decoder.upper.kv.values] == before
    outputs = engine.decoder.upper.binding.get_outputs()  # present buffers of the last run are the cache itself
    assert {value.data_ptr() for value in outputs} >= {value.data_ptr() for value in engine.decoder.upper.kv.keys}


class RecordingBinding:
    """An IOBinding stand-in that records every bind call and forwards everything."""

    def __init__(self, raw, calls: list[str]) -> None:
        self._raw, self._calls = raw, calls

    def bind_ortvalue_input(self, name, value):
        self._calls.append(name)
        self._raw.bind_ortvalue_input(name, value)

    def bind_ortvalue_output(self, name, value):
        self._calls.append(name)
        self._raw.bind_ortvalue_output(name, value)

    def __getattr__(self, name):
        return getattr(self._raw, name)


def test_cpu_steps_do_not_rebind_what_is_bound(tiny):
    """On the CPU provider a plain step binds nothing its graphs already have: the bind calls of a
    generation do not grow with its length (the host buffers are read and written in place)."""
    _, folder = tiny
    engine = Engine.from_folder(folder, row_calls="native")
    plain = engine.generate(PROMPTS[0], max_new_tokens=12, mode="greedy").tokens
    counts = []
    for new in (4, 12):
        calls: list[str] = []
        for graph in (engine.decoder.lower, engine.decoder.upper):
            graph.binding.raw = RecordingBinding(graph.binding.raw, calls)
        assert engine.generate(PROMPTS[0], max_new_tokens=new, mode="greedy").tokens == plain[:new]
        for graph in (engine.decoder.lower, engine.decoder.upper):
            graph.binding.raw = graph.binding.raw._raw
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0  # the prefill's row views, then the one-row views once


def test_device_bindings_rebind_inputs_every_call():
    """Device providers copy a host input when it is bound: there the same input is bound again each time."""

    class DeviceSession:
        def __init__(self, calls):
            self.calls = calls

        def io_binding(self):
            return RecordingBinding(types.SimpleNamespace(bind_ortvalue_input=lambda *a: None,
                                                          bind_ortvalue_output=lambda *a: None), self.calls)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    value = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, dtype=np.int64))
    device_calls, cpu_calls = [], []
    device = Binding(DeviceSession(device_calls))
    cpu_session = DeviceSession(cpu_calls)
    cpu_session.get_providers = lambda: ["CPUExecutionProvider"]
    cpu = Binding(cpu_session)
    for binding in (device, cpu):
        for _ in range(3):
            binding.input("num_logits", value)
            binding.output("logits", value)
    assert device_calls == ["num_logits", "logits", "num_logits", "num_logits"]
    assert cpu_calls == ["num_logits", "logits"]


def test_reuse_cache_gives_the_same_tokens(engine):
    first = engine.generate(PROMPTS[0], max_new_tokens=12)
    follow_up = PROMPTS[0] + first.tokens + [8, 9]
    reused = engine.generate(follow_up, max_new_tokens=12, reuse_cache=True)
    assert reused.tokens == engine.generate(follow_up, max_new_tokens=12).tokens


def test_defaults_come_from_tuned_over_spaf(export_copy, tiny):
    spaf = tiny[0].config
    settings = Engine.from_folder(export_copy).settings()
    assert (settings.num_draft_tokens, settings.serial_parallel_transition) == (
        spaf.num_draft_tokens, spaf.serial_parallel_transition)
    edit_manifest(export_copy, lambda data: data.update(tuned={"num_draft_tokens": 3, "draft_stop_threshold": 0.2}))
    settings = Engine.from_folder(export_copy).settings()
    assert (settings.num_draft_tokens, settings.serial_parallel_transition) == (3, 2)
    assert settings.draft_stop_threshold == 0.2 and settings.params.greedy
    assert Engine.from_folder(export_copy).settings(num_draft_tokens=1).serial_parallel_transition == 1


def test_int4_on_a_cpu_stops_drafts_at_its_floor_unless_told_otherwise(tmp_path):
    """A verify row costs more at int4 on a CPU: the untuned threshold rises to the floor; a tuned entry
    and an explicit option still win, and the fp32 export of the same model keeps its config's value."""
    floor = STOP_THRESHOLD_FLOORS[("cpu", "int4", cpu_kernels())]
    model = make_tiny_spaf("llama", spaf_config=SpAFConfig(cutoff_layer=2, draft_stop_threshold=floor / 2),
                           **EXPORTABLE)
    fp32 = Engine.from_folder(export(model, tmp_path / "fp32", max_length=64))
    assert fp32.settings().draft_stop_threshold == floor / 2
    folder = export(model, tmp_path / "int4", quantization="int4", max_length=64)
    engine = Engine.from_folder(folder)
    assert engine.settings().draft_stop_threshold == engine.untuned_defaults["draft_stop_threshold"] == floor
    assert engine.settings(draft_stop_threshold=0.1).draft_stop_threshold == 0.1
    edit_manifest(folder, lambda data: data.update(tuned={"draft_stop_threshold": 0.2}))
    assert Engine.from_folder(folder).settings().draft_stop_threshold == 0.2


@pytest.mark.parametrize("provider, quantization, kernels, config, expected", [
    ("cpu", "int4", VNNI, 0.15, {"draft_stop_threshold": 0.3}),
    ("cpu", "int4", VNNI, None, {"draft_stop_threshold": 0.3}),  # never stopping is raised too
    ("cpu", "int4", VNNI, 0.5, {}),  # a stricter config keeps its own
    ("cpu", "int4", OTHER, 0.15, {"draft_stop_threshold": 0.5}),  # AVX2 only: rows cost more
    ("cpu", "int8", OTHER, 0.3, {"draft_stop_threshold": 0.5}),
    ("cpu", None, OTHER, 0.15, {}),
    ("cuda", "int4", None, 0.15, {}),  # rows are cheap on a GPU: tune decides there
])
def test_precision_floors(provider, quantization, kernels, config, expected):
    assert precision_defaults(provider, quantization, {"draft_stop_threshold": config}, kernels) == expected


def test_cpu_kernel_class_follows_the_vector_extensions():
    assert cpu_kernels(["AVX2", "FMA", "AVX-512F", "AVX-512BW", "AVX-512 VNNI"]) == VNNI
    assert cpu_kernels(["AVX2", "FMA"]) == cpu_kernels(["NEON", "NEON dotprod"]) == cpu_kernels([]) == OTHER


def test_a_stream_stops_when_another_generation_starts(byte_engine):
    engine, _ = byte_engine
    pieces = iter(engine.stream("abc", max_new_tokens=60, temperature=1.0, seed=0, chat=False))
    next(pieces)
    engine.generate([5, 6], max_new_tokens=3)
    with pytest.raises(RuntimeError, match="Another generation started"):
        list(pieces)


# ---- stopping -------------------------------------------------------------
def test_stops_at_eos(export_copy, engine):
    tokens = engine.generate(PROMPTS[0], max_new_tokens=30).tokens
    stop = next(t for t in tokens[4:] if t not in tokens[:4])  # first occurrence at index >= 4
    edit_manifest(export_copy, lambda data: data.update(eos_token_ids=[stop]))
    result = Engine.from_folder(export_copy).generate(PROMPTS[0], max_new_tokens=30)
    assert result.stop_reason == "eos"
    assert result.tokens == tokens[: tokens.index(stop) + 1]


@pytest.mark.parametrize("row_calls, context", [("native", 15), ("padded", 14)])
def test_stops_at_the_context_limit(tiny, row_calls, context, tmp_path):
    """16 cache rows: the stacks' attention writes one row past each call, and padded one-row calls
    one more (docs/runtime.md, "Row invariance")."""
    model = tiny[0]
    engine = Engine.from_folder(export(model, tmp_path / "export", max_length=16), row_calls=row_calls)
    assert engine.max_length == context
    result = engine.generate(PROMPTS[0], max_new_tokens=50)
    assert result.stop_reason == "context"
    assert len(PROMPTS[0]) + len(result.tokens) == context + 1  # every position 0..context-1 was processed
    assert result.tokens == base_greedy(model.base, PROMPTS[0], len(result.tokens), sorted(engine.eos))
    with pytest.raises(ContextLengthError, match=f"{context + 1} tokens.*context is {context}"):
        engine.generate(list(range(1, context + 2)), max_new_tokens=1)


# ---- sampling -------------------------------------------------------------
def chi_square_fits(counts: np.ndarray, probs: np.ndarray, alpha_z: float = 3.09) -> bool:
    """Pearson chi-square goodness of fit at alpha = 0.001 (z = 3.09), cells with < 5 expected pooled.

    A sample outside the support is a misfit. The critical value is the Wilson-Hilferty
    approximation of the chi-square quantile.
    """
    if counts[probs == 0].sum() > 0:
        return False
    expected = probs * counts.sum()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    critical = df * (1 - 2 / (9 * df) + alpha_z * np.sqrt(2 / (9 * df))) ** 3
    return statistic < critical


@torch.no_grad()
def test_sampled_tokens_follow_the_base_distribution(tiny, export_copy):
    """First and second new tokens vs the base model's exact (processed) distributions."""
    model, _ = tiny
    engine = Engine.from_folder(export_copy)
    engine.decoder.eos = frozenset()  # no EOS stop: every sample has two new tokens (a manifest needs EOS ids)
    params = SamplingParams(temperature=0.9, top_k=12, top_p=0.95)
    prompt, samples = [5, 17, 33], 1200

    def target(ids):  # processed p of the next token, float64 [V]
        return logits_to_probs(model.base(torch.tensor([ids])).logits[0, -1].numpy(), params)

    p1 = target(prompt)
    p2 = sum(p1[x] * target(prompt + [x]) for x in np.flatnonzero(p1))
    counts = np.zeros((2, p1.size))
    drafted = accepted = 0
    for seed in range(samples):
        result = engine.generate(prompt, max_new_tokens=4, temperature=0.9, top_k=12, top_p=0.95, seed=seed,
                                 num_draft_tokens=3, serial_parallel_transition=1)
        counts[0, result.tokens[0]] += 1
        counts[1, result.tokens[1]] += 1
        drafted, accepted = drafted + sum(result.stats.drafted), accepted + sum(result.stats.accepted)
    assert 0.05 < accepted / drafted < 0.95  # both the accept and the residual paths ran
    assert chi_square_fits(counts[0], p1)
    assert chi_square_fits(counts[1], p2)
    # The test has power: the drafter's own distribution q of the first token is rejected.
    hidden = model.base_features(torch.tensor([prompt]))[model.cutoff][:, -1:]
    q1 = logits_to_probs(model.draft_logits(hidden)[0, -1].numpy(), params)
    assert not chi_square_fits(counts[0], q1)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=9, top_p=0.8)])
def test_target_rows_on_demand_equal_the_batched_computation(params):
    logits = np.random.default_rng(0).standard_normal((4, 96)).astype(np.float32)
    lazy, batched = TargetProbs(logits, params), logits_to_probs(logits, params)
    assert len(lazy) == 4
    for j in (2, 0, 3, 2):
        if params.greedy:  # the logits row: greedy acceptance reads its argmax, the one-hot's
            assert np.argmax(lazy[j]) == np.argmax(batched[j]) and batched[j].max() == 1.0
        else:
            assert np.array_equal(lazy[j], batched[j])
    ties = np.zeros((1, 96), dtype=np.float32)  # a tie: both pick its first index
    assert np.argmax(TargetProbs(ties, params)[0]) == np.argmax(logits_to_probs(ties, params)[0])


def test_sampling_is_reproducible_with_a_seed(engine):
    options = dict(max_new_tokens=16, temperature=1.0, top_p=0.9)
    first = engine.generate(PROMPTS[0], seed=11, **options).tokens
    assert engine.generate(PROMPTS[0], seed=11, **options).tokens == first
    assert any(engine.generate(PROMPTS[0], seed=s, **options).tokens != first for s in (12, 13, 14))


def test_sampling_matches_the_pytorch_reference_draw_for_draw(tiny, engine):
    """Same seed, same rng calls in the same order: the engine reproduces the reference's samples."""
    model, _ = tiny
    options = dict(temperature=0.8, top_k=20, seed=5, num_draft_tokens=3, serial_parallel_transition=2)
    result = engine.generate(PROMPTS[1], max_new_tokens=20, **options)
    reference = spaf_generate(model, PROMPTS[1], max_new_tokens=20, eos_token_ids=sorted(engine.eos), **options)
    assert result.tokens == reference.tokens


# ---- adapters that read the top state (fused) ------------------------------
def make_fused_spaf(seed: int = 0):
    """Tiny Llama, fused adapter with random non-zero weights, identity upper layers.

    The identity upper layers make drafts close to the target, so verify steps both accept
    and reject; the adapter's out layer is random (not the zero init), so the top state
    really changes drafts.
    """
    model = make_tiny_spaf("llama", seed, spaf_config=SpAFConfig(cutoff_layer=2, adapter_kind="fused"), **EXPORTABLE)
    make_upper_identity(model)
    adapter = model.adapters["2"]
    generator = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        adapter.state_norm.weight.fill_(1.0)
        adapter.top_norm.weight.fill_(1.0)
        adapter.inner.weight.copy_(torch.randn(adapter.inner.weight.shape, generator=generator) * 64**-0.5)
        adapter.inner.bias.zero_()
        adapter.out.weight.copy_(torch.randn(adapter.out.weight.shape, generator=generator) * 0.005)
        adapter.out.bias.zero_()
    return model


def probe_draft(decoder, params, rng) -> Proposal:
    """One serial draft from the kept state; the caller undoes the cache rows it wrote."""
    return decoder.proposer.spaf.propose(1, DecodeSettings(params, 1, 1, None, "spaf"), rng)


def fresh_top_states(model, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cutoff states, top states) of a full forward over ``tokens``: [1, len, H] each."""
    hidden = model.base_features(torch.tensor([tokens]))
    return hidden[model.cutoff], hidden[-1]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    model = make_fused_spaf()
    assert model.reads_top_state()
    hidden, top = fresh_top_states(model, PROMPTS[0])
    with torch.no_grad():
        exact = model.draft_logits(hidden[:, 1:], prev_top=top[:, :-1]).argmax(-1)
        zeros = model.draft_logits(hidden[:, 1:], prev_top=torch.zeros_like(top[:, :-1])).argmax(-1)
    assert (exact != zeros).any()  # the top state changes drafts
    return model, export(model, tmp_path_factory.mktemp("rt") / "fused")


@pytest.fixture(scope="module")
def fused_engine(fused):
    return Engine.from_folder(fused[1])


def check_greedy_against_reference(model, engine, num_drafts: int, transition: int) -> None:
    """Engine greedy == PyTorch reference == base greedy, with the same drafts accepted; some accepted."""
    eos = sorted(engine.eos)
    accepted = 0
    for prompt in (*PROMPTS, [9]):  # a one-token prompt: no position before the first draft
        result = engine.generate(prompt, max_new_tokens=30, num_draft_tokens=num_drafts,
                                 serial_parallel_transition=transition)
        reference = torch_greedy(model, prompt, 30, eos, num_draft_tokens=num_drafts,
                                 serial_parallel_transition=transition)
        assert result.tokens == reference.tokens == base_greedy(model.base, prompt, 30, eos)
        assert result.stats.accepted == reference.stats.accepted  # the same drafts, from the same states
        accepted += sum(result.stats.accepted)
    assert accepted > 0


def check_sampling_draw_for_draw(model, engine, transitions: list[int]) -> None:
    """Seeded sampling: the engine's tokens and acceptances equal the reference's, seed by seed."""
    eos = sorted(engine.eos)
    for seed, transition in enumerate(transitions):
        options = dict(temperature=0.8, top_k=20, seed=seed, num_draft_tokens=4, serial_parallel_transition=transition)
        result = engine.generate(PROMPTS[seed % 2], max_new_tokens=20, **options)
        reference = spaf_generate(model, PROMPTS[seed % 2], max_new_tokens=20, eos_token_ids=eos, **options)
        assert result.tokens == reference.tokens
        assert result.stats.accepted == reference.stats.accepted


@pytest.mark.parametrize("num_drafts,transition", PAIRS)
def test_fused_greedy_equals_reference_and_base(fused, fused_engine, num_drafts, transition):
    check_greedy_against_reference(fused[0], fused_engine, num_drafts, transition)


def test_fused_sampling_matches_the_reference_draw_for_draw(fused, fused_engine):
    check_sampling_draw_for_draw(fused[0], fused_engine, [0, 2, 0, 2])


@torch.no_grad()
def test_fused_top_state_after_rejections_is_the_full_forward_one(fused):
    """After each commit the engine's top state of T-1 is a fresh forward's; the next draft reads it."""
    model, folder = fused
    engine = Engine.from_folder(folder)
    decoder = engine.decoder
    settings = engine.settings(num_draft_tokens=4, serial_parallel_transition=1)
    result = DecodeResult(tokens=[], stats=GenerationStats())
    rng = np.random.default_rng(0)
    for _ in decoder.steps(list(PROMPTS[0]), 24, settings, rng, result):
        hidden, top = fresh_top_states(model, decoder.tokens)
        np.testing.assert_allclose(decoder.exact_top, top[:, -2:-1].numpy(), rtol=1e-4, atol=1e-5)
        first = probe_draft(decoder, settings.params, rng)  # one serial draft from the kept state
        expected = model.draft_logits(hidden[:, -1:], prev_top=top[:, -2:-1])[0, -1].numpy()
        np.testing.assert_allclose(decoder.buffers.draft_logits[0, 0], expected, rtol=1e-4, atol=1e-5)
        assert first.tokens == [int(expected.argmax())]
        decoder.lower.kv.rewind_to(decoder.position)  # undo the probe's lower-stack step
    assert any(a < d for a, d in zip(result.stats.accepted, result.stats.drafted))  # rejections happened
    assert sum(result.stats.accepted) > 0


@torch.no_grad()
def test_fused_reuse_cache_recomputes_the_last_prompt_row(fused, fused_engine):
    """A follow-up prompt fully in the cache still gets the exact top state of its last row."""
    model, _ = fused
    first = fused_engine.generate(PROMPTS[0], max_new_tokens=12)
    follow_up = PROMPTS[0] + first.tokens[:6]  # every row but the pending token's is cached
    fused_engine.decoder.prefill(follow_up, reuse_cache=True, active=True)
    _, top = fresh_top_states(model, follow_up)
    np.testing.assert_allclose(fused_engine.decoder.exact_top, top[:, -2:-1].numpy(), rtol=1e-4, atol=1e-5)
    options = dict(max_new_tokens=12, temperature=0.8, seed=2)
    reused = fused_engine.generate(follow_up, reuse_cache=True, **options)
    fresh = fused_engine.generate(follow_up, **options)
    assert reused.tokens == fresh.tokens and reused.stats.accepted == fresh.stats.accepted


@pytest.mark.parametrize("transition", [1, 0])
def test_fused_reuse_cache_drafts_as_a_fresh_prefill_does(fused_engine, transition):
    check_reuse_matches_fresh(fused_engine, transition)


def prefill_state(decoder) -> dict[str, np.ndarray]:
    """What drafting reads after a prefill: f(T-1), f(T-2), h(T-1) and the adapter cache's entries."""
    buffers = decoder.buffers
    state = {name: getattr(buffers, name).array[:, :1].copy() for name in ("prev_tops", "prev_top2", "prev_hidden")}
    calls = decoder.proposer.spaf.calls
    if calls.attends:
        kv = calls.draft_head.kv
        for layer in kv.layers:
            state[f"adapter {layer}"] = np.concatenate(kv.rows(layer))
    return state


def check_reuse_matches_fresh(engine, transition: int) -> None:
    """A prefill that reuses cached rows leaves the states drafting reads, and so the drafts, as a fresh one:
    same tokens, same acceptances. It recomputes only the last rows of a follow-up prompt."""
    decoder = engine.decoder
    first = engine.generate(PROMPTS[0], max_new_tokens=12)
    options = dict(max_new_tokens=12, temperature=0.8, seed=2, num_draft_tokens=3,
                   serial_parallel_transition=transition)
    for follow_up in (PROMPTS[0] + first.tokens[:6], PROMPTS[0] + first.tokens[:2] + [5, 9, 7]):
        engine.generate(PROMPTS[0], max_new_tokens=12, num_draft_tokens=3, serial_parallel_transition=transition)
        shared = common_prefix(PROMPTS[0] + first.tokens, follow_up)
        decoder.prefill(follow_up, reuse_cache=True, active=True)
        assert decoder.lower.kv.length == len(follow_up) - 1
        reused = prefill_state(decoder)
        decoder.prefill(follow_up, active=True)
        fresh = prefill_state(decoder)
        assert reused.keys() == fresh.keys()
        for name in fresh:
            np.testing.assert_allclose(reused[name], fresh[name], rtol=1e-4, atol=1e-5, err_msg=name)
        rows = []
        run_lower = decoder.run_lower
        decoder.run_lower = lambda tokens, row: rows.append(len(tokens)) or run_lower(tokens, row)
        try:
            engine.generate(PROMPTS[0], max_new_tokens=12, num_draft_tokens=3, serial_parallel_transition=transition)
            rows.clear()
            reused = engine.generate(follow_up, reuse_cache=True, **options)
            recomputed = rows[0]  # the prefill's one chunk
        finally:
            del decoder.run_lower
        assert recomputed < len(follow_up) - shared + 3, "the shared rows were reused"
        fresh = engine.generate(follow_up, **options)
        assert reused.tokens == fresh.tokens
        assert (reused.stats.accepted, reused.stats.drafted) == (fresh.stats.accepted, fresh.stats.drafted)


def test_plain_greedy_never_runs_the_draft_head(fused_engine, monkeypatch):
    calls = []
    draft_head = fused_engine.decoder.proposer.spaf.calls.draft_head
    run = draft_head.run
    monkeypatch.setattr(draft_head, "run", lambda *args: calls.append(1) or run(*args))
    plain = fused_engine.generate(PROMPTS[0], max_new_tokens=10, mode="greedy")
    assert calls == [] and len(plain.tokens) == 10
    spaf = fused_engine.generate(PROMPTS[0], max_new_tokens=10, proposers="spaf")
    assert spaf.tokens == plain.tokens and len(calls) == sum(spaf.stats.drafted)


def record_num_logits(decoder, monkeypatch) -> list[tuple[int, int]]:
    """(new positions, logits asked for) of every upper-graph call."""
    calls = []
    run = decoder.upper.run

    def recording(cutoff_hidden, new, logits, top_hidden, num_logits, tree=None):
        calls.append((new, num_logits))
        run(cutoff_hidden, new, logits, top_hidden, num_logits, tree)

    monkeypatch.setattr(decoder.upper, "run", recording)
    return calls


@torch.no_grad()
def test_prefill_computes_no_logits(fused, monkeypatch):
    """Prefill asks the upper graph for no logits (no LM head on prompt rows); its top state is unchanged."""
    model, folder = fused
    engine = Engine.from_folder(folder, prefill_chunk=3, row_calls="native")  # the call shapes without padding
    decoder = engine.decoder
    calls = record_num_logits(decoder, monkeypatch)
    prompt = [1, 7, 19, 42, 5, 11, 60, 23]
    decoder.buffers.logits.array[:] = np.nan
    decoder.prefill(prompt, active=True)  # a drafting generation keeps the exact top state
    assert calls == [(3, 0), (3, 0), (1, 0)]  # prompt[:-1] in chunks of 3
    assert np.isnan(decoder.buffers.logits.array).all()  # the logits buffer was never written
    _, top = fresh_top_states(model, prompt)
    np.testing.assert_allclose(decoder.exact_top, top[:, -2:-1].numpy(), rtol=1e-4, atol=1e-5)
    # what the first token depends on is unchanged: it is the base model's first greedy token
    first = engine.generate(prompt, max_new_tokens=1, mode="greedy")
    assert first.tokens == base_greedy(model.base, prompt, 1, sorted(engine.eos))


def test_verify_asks_for_its_rows_only(fused, monkeypatch):
    """Plain greedy asks for 1 row per step, SpAF for D+1; the logits buffer is sized for a verify, not a prefill."""
    _, folder = fused
    engine = Engine.from_folder(folder, row_calls="native")  # the call shapes without padding
    calls = record_num_logits(engine.decoder, monkeypatch)
    prompt = PROMPTS[0]
    plain = engine.generate(prompt, max_new_tokens=6, mode="greedy")
    assert calls == [(len(prompt) - 1, 0)] + [(1, 1)] * 6
    calls.clear()
    spaf = engine.generate(prompt, max_new_tokens=12, num_draft_tokens=3, serial_parallel_transition=1)
    assert spaf.tokens[:6] == plain.tokens
    assert calls[0] == (len(prompt) - 1, 0)
    steps = calls[1:]  # one verify per step: all D+1 rows
    assert len(steps) == spaf.stats.verify_steps and all(new == rows for new, rows in steps)
    assert sum(rows - 1 for _, rows in steps) == sum(spaf.stats.drafted) > 0
    # sized for the widest verify (the row check's at load, or a lookup chain's), not for prefill_chunk rows
    widest = max(MAX_ROWS, engine.settings().lookup_depth) + 1
    assert engine.decoder.buffers.logits.rows == widest < engine.decoder.buffers.rows


# ---- text, chat template and streaming -----------------------------------
def byte_tokenizer():
    """A byte-level BPE without merges (one token per UTF-8 byte): multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=specials[2:])
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] | trim }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


@pytest.fixture(scope="module")
def byte_engine(tmp_path_factory):
    model = make_tiny_spaf("llama", vocab_size=260, **EXPORTABLE)
    model.tokenizer = byte_tokenizer()
    return Engine.from_folder(export(model, tmp_path_factory.mktemp("rt") / "byte_export")), model.tokenizer


def test_incremental_decoder_holds_back_partial_characters():
    tokenizer = TextTokenizer(byte_tokenizer().backend_tokenizer)
    text = "naïve café 👋 世界!"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode())
    decoder = IncrementalDecoder(tokenizer.decode)
    pieces = [decoder.add([token]) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "👋" in pieces  # emitted whole, once its 4th byte arrived


def test_stream_joins_to_the_generated_text(byte_engine):
    engine, _ = byte_engine
    for seed in range(3):
        options = dict(max_new_tokens=40, temperature=1.0, seed=seed, chat=False)
        stream = engine.stream("héllo wörld", **options)
        pieces = list(stream)
        full = engine.generate("héllo wörld", **options)
        assert stream.result.tokens == full.tokens
        assert "".join(pieces) == full.text == stream.result.text


@pytest.mark.parametrize("make_tokenizer", [byte_tokenizer, make_tiny_tokenizer])
def test_chat_template_matches_transformers(make_tokenizer, tmp_path):
    reference = make_tokenizer()
    reference.save_pretrained(tmp_path)
    ours = TextTokenizer.from_folder(tmp_path, reference.chat_template)
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
         {"role": "assistant", "content": "Because."}, {"role": "user", "content": "Ok!"}],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            expected = reference.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                                     return_dict=True)["input_ids"]
            assert ours.encode_chat(messages, generation_prompt) == list(expected)
    assert ours.encode_prompt("Hello", chat=False) == reference("Hello")["input_ids"]


def test_export_tokenizer_applies_the_chat_template(byte_engine):
    engine, reference = byte_engine
    expected = reference.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert engine.encode("Hi") == list(expected)
    assert engine.encode("Hi", chat=False) == reference("Hi")["input_ids"]


# ---- bad input ------------------------------------------------------------
def test_missing_graph(export_copy):
    (export_copy / UPPER_GRAPH).unlink()
    with pytest.raises(ExportFormatError, match="upper.onnx is listed in the manifest but missing"):
        Engine.from_folder(export_copy)
    with pytest.raises(ExportFormatError, match="upper.onnx is missing"):
        Engine.from_folder(export_copy, verify=False)


def test_truncated_graph(export_copy):
    path = export_copy / LOWER_GRAPH
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExportFormatError, match="lower.onnx is corrupt or was modified"):
        Engine.from_folder(export_copy)
    with pytest.raises(ExportFormatError, match="cannot load .*lower.onnx.*truncated, corrupt"):
        Engine.from_folder(export_copy, verify=False)


def test_modified_file_fails_the_checksum(export_copy):
    data = export_copy / f"{UPPER_GRAPH}.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ExportFormatError, match="sha256 .* differs from the manifest"):
        Engine.from_folder(export_copy)


def test_truncated_embedding_table(export_copy):
    path = export_copy / EMBEDDINGS
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ExportFormatError, match="embeddings.bin is corrupt or was modified"):
        Engine.from_folder(export_copy)
    with pytest.raises(ExportFormatError, match=r"embeddings.bin has \d+ bytes.*96 x 64 float32.*truncated"):
        Engine.from_folder(export_copy, verify=False)
    path.unlink()
    with pytest.raises(ExportFormatError, match="embeddings.bin is missing"):
        Engine.from_folder(export_copy, verify=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embedding_rows_are_the_base_embedding(dtype, tmp_path):
    """The rows the engine feeds the lower graph and the drafter are the base's embedding rows (in the export
    dtype), read without torch."""
    model = make_tiny_spaf("qwen2", **EXPORTABLE)
    folder = export(model, tmp_path / "out", dtype=dtype, max_length=32)
    table = EmbeddingTable(folder / EMBEDDINGS, 96, 64, np.dtype(dtype))
    ids = [5, 0, 95, 5, 42]
    expected = model.base.model.embed_tokens.weight.detach()[ids].numpy().astype(dtype)
    np.testing.assert_array_equal(table.rows(ids), expected)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        table.rows([96])


@pytest.mark.parametrize("version", [1, 2, 3, 99])  # 1: lower.onnx held the draft head; 2: upper had no num_logits;
# 3: graphs gathered embedding rows themselves
def test_unknown_manifest_version(export_copy, version):
    edit_manifest(export_copy, lambda data: data.update(format_version=version))
    with pytest.raises(ExportFormatError, match=f"unknown manifest format version {version}.*Re-export"):
        Engine.from_folder(export_copy)


@pytest.mark.parametrize("field,value,message", [  # sizes that change the table's are found before the graphs
    ("hidden_size", 128, r"embeddings.bin has 24576 bytes; the manifest's 96 x 128 float32 table needs 49152"),
    ("max_length", 64, "does not match its manifest.*past_key_values.0.key"),
    ("num_kv_heads", 1, "does not match its manifest.*past_key_values.0.key"),
    ("vocab_size", 100, r"embeddings.bin has 24576 bytes; the manifest's 100 x 64 float32 table needs 25600"),
    ("num_layers", 5, "does not match its manifest.*past_key_values.4.key"),
])
def test_graphs_that_disagree_with_the_manifest(export_copy, field, value, message):
    edit_manifest(export_copy, lambda data: data["sizes"].update({field: value}))
    with pytest.raises(ExportFormatError, match=message):
        Engine.from_folder(export_copy)


def test_top_state_input_must_match_the_manifest(export_copy, fused):
    edit_manifest(export_copy, lambda data: data.update(reads_top_state=True))
    with pytest.raises(ExportFormatError, match="draft_head.onnx does not match its manifest.*'prev_top' is missing"):
        Engine.from_folder(export_copy)
    _, folder = fused
    fused_copy = Path(shutil.copytree(folder, export_copy.parent / "fused"))
    edit_manifest(fused_copy, lambda data: data.update(reads_top_state=False))
    with pytest.raises(ExportFormatError, match="input 'prev_top' is not one the manifest announces"):
        Engine.from_folder(fused_copy)


@pytest.mark.parametrize("cutoff", [0, 4])
def test_cutoff_outside_the_layers(export_copy, cutoff):
    edit_manifest(export_copy, lambda data: data.update(cutoff_layer=cutoff))
    with pytest.raises(ExportFormatError, match=f"cutoff_layer {cutoff} outside 1..3"):
        Engine.from_folder(export_copy)


def test_prompt_longer_than_the_context(engine):
    context = engine.max_length  # 127 of 128 cache rows, or 126 where one-row calls are padded on this device
    with pytest.raises(ContextLengthError, match=f"{context + 1} tokens but the export's context is {context}"):
        engine.generate([1] * (context + 1), max_new_tokens=4)
    with pytest.raises(ContextLengthError, match="empty"):
        engine.generate([], max_new_tokens=4)


@pytest.mark.parametrize("options,named", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_draft_tokens=0), "num_draft_tokens"),
    (dict(num_draft_tokens=2, serial_parallel_transition=3), "serial_parallel_transition"),
    (dict(draft_stop_threshold=1.5), "draft_stop_threshold"),
    (dict(mode="beam"), "mode"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_invalid_settings(byte_engine, options, named):
    engine, _ = byte_engine
    with pytest.raises(ConfigError, match=f"Invalid {named}"):
        engine.generate(PROMPTS[0], **{"max_new_tokens": 4, **options})
    with pytest.raises(ConfigError, match=f"Invalid {named}"):
        engine.stream("hello", **{"max_new_tokens": 4, **options})


@pytest.mark.parametrize("options", [
    dict(lookup_depth=100_000),  # once allocated a 37 GiB tree mask before failing
    dict(num_draft_tokens=MAX_ROWS),
    dict(proposers="spaf", num_draft_tokens=50),
])
def test_verify_calls_wider_than_the_row_check_are_refused(byte_engine, options):
    """The engine claims row invariance for the call widths it compared at load: wider settings fail
    before anything is allocated, naming the limit; the widest allowed still runs."""
    engine, _ = byte_engine
    before = engine.decoder.buffers.logits.array.shape  # [1, rows, V]
    with pytest.raises(ConfigError, match=f"verifies at most {MAX_ROWS}.*at most {MAX_ROWS - 1}"):
        engine.generate(PROMPTS[0], max_new_tokens=4, **options)
    assert engine.decoder.buffers.logits.array.shape == before  # nothing grown
    widest = {key: min(value, MAX_ROWS - 1) for key, value in options.items() if key != "proposers"}
    assert len(engine.generate(PROMPTS[0], max_new_tokens=4, **widest).tokens) == 4
    assert engine.rows.rows == MAX_ROWS  # and the load-time check compared calls that wide


def test_bad_prompts(engine):
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        engine.generate([5, 96], max_new_tokens=2)
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        engine.generate("text needs a tokenizer", max_new_tokens=2)


def test_unavailable_provider_names_the_available_ones(tiny):
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider.*available: .*CPUExecutionProvider"):
        Engine.from_folder(tiny[1], provider="cuda")
    with pytest.raises(ConfigError, match="Unknown provider 'gpu'; choose one of cpu, cuda"):
        Engine.from_folder(tiny[1], provider="gpu")


def test_a_provider_that_falls_back_to_the_cpu_is_an_error(tiny, monkeypatch):
    """onnxruntime retries on the CPU when e.g. CUDA's libraries are missing; the engine must not
    then report CPU numbers as CUDA ones."""
    import onnxruntime as ort

    from spaf_edge.runtime import session as sessions

    class CudaFailsToStart(ort.InferenceSession):
        def __init__(self, path, options, providers):
            super().__init__(path, options, providers=["CPUExecutionProvider"])

    preloads = []
    monkeypatch.setattr(ort, "InferenceSession", CudaFailsToStart)
    monkeypatch.setattr(ort, "preload_dlls", lambda: preloads.append(1))
    monkeypatch.setitem(sessions._state, "cuda_loaded", False)
    options = sessions.compatible_session_options()
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider did not start for lower.onnx; "
                                                       "onnxruntime fell back to CPUExecutionProvider"):
        sessions.open_session(tiny[1] / LOWER_GRAPH, options, sessions.PROVIDERS["cuda"])
    assert sessions.open_session(tiny[1] / LOWER_GRAPH, options, sessions.PROVIDERS["cpu"]).get_providers() == [
        "CPUExecutionProvider"]
    assert preloads == [1], "CUDA's libraries are preloaded once, for CUDA providers only"


# ---- the real default model -----------------------------------------------
@pytest.fixture(scope="module")
def default_export(default_base, tmp_path_factory):
    from spaf_edge.core.config import SpAFConfig
    from spaf_edge.model import SpAFModel

    base, tokenizer = default_base
    model = SpAFModel(base, SpAFConfig(), tokenizer)
    return model, export(model, tmp_path_factory.mktemp("rt") / "default", max_length=256)


@pytest.mark.real_model
def test_default_model_greedy_is_lossless(default_export):
    model, folder = default_export
    engine = Engine.from_folder(folder)
    eos = sorted(engine.eos)
    ids = engine.encode("What is 7 times 8?")
    result = engine.generate(ids, max_new_tokens=12)
    reference = torch_greedy(model, ids, 12, eos)
    assert result.tokens == reference.tokens == base_greedy(model.base, ids, 12, eos)
    assert result.text == model.tokenizer.decode(result.tokens, skip_special_tokens=True)


@pytest.mark.real_model
def test_default_model_text_matches_transformers(default_export):
    model, folder = default_export
    engine = Engine.from_folder(folder)
    conversation = [{"role": "user", "content": "Name three colors."}]
    expected = model.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
    assert engine.encode("Name three colors.") == list(expected["input_ids"])
    conversation += [{"role": "assistant", "content": "Red, green, blue."}, {"role": "user", "content": "Más? 🎨"}]
    expected = model.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
    assert engine.tokenizer.encode_chat(conversation) == list(expected["input_ids"])
    stream = engine.stream("Write one sentence about the sea.", max_new_tokens=24)
    text = "".join(stream)
    assert text == stream.result.text == model.tokenizer.decode(stream.result.tokens, skip_special_tokens=True)
    assert stream.result.tokens == engine.generate("Write one sentence about the sea.", max_new_tokens=24).tokens


# ---- an adapter that attends across positions (its own KV cache) --------------
def make_attention_spaf(seed: int = 0):
    """Tiny Llama, attention adapter with random non-zero weights (attention and MLP), identity upper layers."""
    config = SpAFConfig(cutoff_layer=2, adapter_kind="attention", adapter_dim_ratio=1.0)
    model = make_tiny_spaf("llama", seed, spaf_config=config, **EXPORTABLE)
    make_upper_identity(model)
    adapter = model.adapters["2"]
    generator = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for norm in (adapter.state_norm, adapter.top_norm, adapter.mlp_norm):
            norm.weight.fill_(1.0)
        adapter.qkv.weight.copy_(torch.randn(adapter.qkv.weight.shape, generator=generator) * 0.3)
        adapter.o.weight.copy_(torch.randn(adapter.o.weight.shape, generator=generator) * 0.002)
        adapter.inner.weight.copy_(torch.randn(adapter.inner.weight.shape, generator=generator) * 64**-0.5)
        adapter.inner.bias.zero_()
        adapter.out.weight.copy_(torch.randn(adapter.out.weight.shape, generator=generator) * 0.005)
        adapter.out.bias.zero_()
    return model


@pytest.fixture(scope="module")
def attending(tmp_path_factory):
    model = make_attention_spaf()
    assert model.attends()
    with torch.no_grad():  # what the cache holds changes drafts: earlier positions' entries matter
        hidden, top = fresh_top_states(model, PROMPTS[0])
        previous = torch.nn.functional.pad(top[:, :-1], (0, 0, 1, 0))
        exact = model.adapt(hidden, prev_top=previous, context=model.adapter_context(hidden, previous))
        other = model.adapt(hidden, prev_top=previous, context=model.adapter_context(hidden.flip(1), previous))
    assert (exact - other)[:, 1:].abs().amax() > 1e-3
    return model, export(model, tmp_path_factory.mktemp("rt") / "attention")


@pytest.fixture(scope="module")
def attending_engine(attending):
    return Engine.from_folder(attending[1])


@torch.no_grad()
def exact_first_draft_logits(model, tokens: list[int]) -> np.ndarray:
    """The first draft at the pending token of ``tokens`` from exact states only (the training path). [V_d]"""
    hidden, top = fresh_top_states(model, tokens)
    previous = torch.nn.functional.pad(top[:, :-1], (0, 0, 1, 0))
    context = model.adapter_context(hidden, previous)
    adapted = model.adapt(hidden, prev_top=previous, context=context)
    return model.lm_head_rows(model.top_state(adapted), model.draft_vocab)[0, -1].numpy()


@pytest.mark.parametrize("num_drafts,transition", PAIRS)
def test_attention_adapter_greedy_equals_reference_and_base(attending, attending_engine, num_drafts, transition):
    check_greedy_against_reference(attending[0], attending_engine, num_drafts, transition)


def test_attention_adapter_sampling_matches_the_reference_draw_for_draw(attending, attending_engine):
    check_sampling_draw_for_draw(attending[0], attending_engine, [0, 1, 2, 0])


@torch.no_grad()
@pytest.mark.parametrize("transition", [1, 0])
def test_attention_adapter_cache_is_exact_after_every_commit(attending, transition):
    """After each commit (rejections included) the first draft equals the adapter run on exact states only:
    the chain's drafted entries (with s = 0 the first one too) were dropped and the newly exact positions
    recomputed."""
    model, folder = attending
    engine = Engine.from_folder(folder, prefill_chunk=3)  # several prefill chunks
    decoder = engine.decoder
    # sampling at temperature 1: drafts are accepted now and then also when every draft is aligned
    settings = engine.settings(temperature=1.0, num_draft_tokens=4, serial_parallel_transition=transition)
    result = DecodeResult(tokens=[], stats=GenerationStats())
    rng = np.random.default_rng(0)
    for _ in decoder.steps(list(PROMPTS[0]) + [4, 8], 24, settings, rng, result):
        calls = decoder.proposer.spaf.calls
        kv_length, queued = calls.draft_head.kv.length, calls.queued
        probe_draft(decoder, settings.params, np.random.default_rng(1))
        expected = exact_first_draft_logits(model, decoder.tokens)
        np.testing.assert_allclose(decoder.buffers.draft_logits[0, 0], expected, rtol=1e-4, atol=1e-5)
        # undo the probe: the lower step, the adapter entries it wrote, the rows it consumed
        decoder.lower.kv.rewind_to(decoder.position)
        calls.draft_head.kv.rewind_to(kv_length)
        calls._queued = queued  # the queued rows are still in their buffers
    assert any(a < d for a, d in zip(result.stats.accepted, result.stats.drafted))  # rejections happened
    assert sum(result.stats.accepted) > 0


@pytest.mark.parametrize("transition", [1, 0])
def test_attention_adapter_reuse_cache_keeps_its_exact_entries(attending_engine, transition):
    check_reuse_matches_fresh(attending_engine, transition)


def test_attention_adapter_plain_greedy_skips_its_cache(attending_engine):
    """Plain greedy computes no adapter entries; a later reusing SpAF prefill recomputes the missing ones."""
    first = attending_engine.generate(PROMPTS[0], max_new_tokens=12)
    plain = attending_engine.generate(PROMPTS[0], max_new_tokens=12, mode="greedy")
    assert attending_engine.decoder.proposer.spaf.calls.draft_head.kv.length == 0 and plain.tokens == first.tokens
    follow_up = PROMPTS[0] + first.tokens[:6]
    reused = attending_engine.generate(follow_up, max_new_tokens=12, reuse_cache=True)
    assert reused.tokens == attending_engine.generate(follow_up, max_new_tokens=12).tokens
