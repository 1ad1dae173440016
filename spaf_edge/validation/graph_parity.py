"""Graph parity (DESIGN §7): each exported graph against the PyTorch modules it came from.

The graphs run in ONNX Runtime exactly as the engine runs them: shared weights handed
in once (:class:`spaf_edge.core.shared_weights.SharedWeights`), KV caches preallocated and
bound as past *and* present of one OrtValue. The scenario walks the cache through every
state the engine uses: a prefill chunk, a decode step, a multi-token verify chunk on a
past, and a chunk after a rollback (the valid length lowered, stale rows overwritten).
Every graph gets the same inputs as its PyTorch counterpart: the upper stack, the
drafter and the draft head are fed PyTorch states, so each error is the graph's own.

Per step the draft head runs twice, as in a draft chain: on the exact cutoff state of
the chunk's last position with the exact top state of the position before (zeros at the
first step, the one-token-prompt case), then on the AlignmentHead's pseudo state with
the first call's drafted top state (step name ``{step}/chained``). A draft head whose
adapter does not read the top state has no ``prev_top`` input and gets none.

Error metrics per output: ``max_abs = max |onnx - torch|`` and ``max_rel = max_abs /
max |torch|`` (relative to the output's scale; elementwise ratios blow up near zero).
Thresholds apply to ``max_rel`` of the logits outputs; hidden states are reported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spaf_edge.core import io_names
from spaf_edge.core.errors import ConfigError
from spaf_edge.core.manifest import Manifest
from spaf_edge.core.shared_weights import SharedWeights
from spaf_edge.model import SpAFModel
from spaf_edge.runtime.embeddings import EmbeddingTable
from spaf_edge.runtime.session import open_shared_session, resolve_provider

# Bounds on max_rel of the logits; a quantized export is compared with the float model,
# so its error is quantization error (the bound only catches a broken graph).
THRESHOLDS = {"float32": 1e-4, "float16": 1e-2, "int8": 0.1, "int4": 0.5}
LOGIT_OUTPUTS = (io_names.LOGITS, io_names.DRAFT_LOGITS)

# (step name, new tokens, rewind before the step by this many rows)
DEFAULT_STEPS = (("prefill", 7, 0), ("decode", 1, 0), ("verify", 4, 0), ("rollback", 3, 2))


@dataclass
class OutputError:
    graph: str
    output: str
    step: str
    max_abs: float
    max_rel: float
    top1_agreement: float | None = None  # logits only: share of positions with the same argmax


@dataclass
class GraphParityReport:
    export_dir: str
    dtype: str
    quantization: str | None
    threshold: float
    errors: list[OutputError] = field(default_factory=list)

    def worst(self, graph: str | None = None, output: str | None = None) -> dict[str, float]:
        """Largest max_abs / max_rel over the matching errors."""
        rows = [e for e in self.errors
                if (graph is None or e.graph == graph) and (output is None or e.output == output)]
        return {"max_abs": max((e.max_abs for e in rows), default=0.0),
                "max_rel": max((e.max_rel for e in rows), default=0.0)}

    @property
    def per_graph(self) -> dict[str, dict[str, dict[str, float]]]:
        outputs = sorted({(e.graph, e.output) for e in self.errors})
        summary: dict[str, dict[str, dict[str, float]]] = {}
        for graph, output in outputs:
            summary.setdefault(graph, {})[output] = self.worst(graph, output)
        return summary

    @property
    def failures(self) -> list[OutputError]:
        return [e for e in self.errors if e.output in LOGIT_OUTPUTS and not e.max_rel <= self.threshold]

    @property
    def passed(self) -> bool:
        return bool(self.errors) and not self.failures

    def add(self, graph: str, step: str, actual: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> None:
        for output, reference in expected.items():
            self.errors.append(compare(graph, output, step, actual[output], reference))

    def to_dict(self) -> dict[str, Any]:
        return {"export_dir": self.export_dir, "dtype": self.dtype, "quantization": self.quantization,
                "threshold": self.threshold, "passed": self.passed, "per_graph": self.per_graph,
                "errors": [asdict(e) for e in self.errors]}

    def summary(self) -> str:
        lines = [f"graph parity ({self.dtype}{', ' + self.quantization if self.quantization else ''}; "
                 f"logits max_rel <= {self.threshold:g}): {'PASS' if self.passed else 'FAIL'}"]
        for graph, outputs in self.per_graph.items():
            for output, worst in outputs.items():
                lines.append(f"  {graph:10s} {output:14s} max_abs {worst['max_abs']:.3g}  "
                             f"max_rel {worst['max_rel']:.3g}")
        return "\n".join(lines)


def check_graphs(
    model: SpAFModel,
    export_dir: str | os.PathLike,
    steps: Sequence[tuple[str, int, int]] = DEFAULT_STEPS,
    seed: int = 0,
    threshold: float | None = None,
    provider: str = "cpu",
    token_ids: Sequence[int] | None = None,
) -> GraphParityReport:
    """Run every graph with ORT and ``model``'s PyTorch modules on the same inputs.

    ``token_ids`` (e.g. a tokenized real prompt, at least ``sum(step lengths) + len(steps)``
    long) replaces the default seeded random tokens; ``threshold`` overrides the bound
    on the logits' max_rel (default by dtype / quantization: :data:`THRESHOLDS`).
    """
    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir)
    if threshold is None:
        threshold = THRESHOLDS[manifest.quantization or manifest.dtype]
    report = GraphParityReport(str(export_dir), manifest.dtype, manifest.quantization, threshold)
    graphs = GraphSessions(export_dir, manifest, provider)
    exit_layer = manifest.cutoff_layer
    total = sum(length for _, length, _ in steps)
    if token_ids is None:
        tokens = np.random.default_rng(seed).integers(0, manifest.sizes.vocab_size, size=total + len(steps))
    else:
        tokens = np.asarray(token_ids, dtype=np.int64)
        if tokens.size < total + len(steps):
            raise ConfigError(f"check_graphs needs at least {total + len(steps)} token ids, got {tokens.size}.")
    dtype = manifest.dtype
    device = model.base_device
    with torch.no_grad():
        lower_cache = model.new_cache(model.lower_layer_ids(exit_layer), manifest.sizes.max_length)
        upper_cache = model.new_cache(model.upper_layer_ids(exit_layer), manifest.sizes.max_length)
        adapter_cache = model.new_adapter_cache(manifest.sizes.max_length, exit_layer)  # attending kinds only
        tops = torch.zeros(1, 0, manifest.sizes.hidden_size, device=device)  # top states of positions 0 .. P-1
        cursor = 0
        for index, (step, length, rewind) in enumerate(steps):
            if rewind:
                for stack in (lower_cache, upper_cache, graphs):
                    stack.rewind_to(stack.length - rewind)
                tops = tops[:, : graphs.length]
                if adapter_cache is not None:
                    adapter_cache.rewind_to(graphs.length)
                    graphs.adapter_length = graphs.length
            ids = tokens[cursor : cursor + length][None]  # [1, S]
            cursor += length
            ids_t = torch.as_tensor(ids, device=device)
            hidden = model.run_layers(model.embed(ids_t), lower_cache)  # [1, S, H]
            final, top = model.run_upper(hidden, upper_cache, exit_layer=exit_layer)  # top: what the drafter reads
            lower = graphs.run_lower(ids)
            upper = graphs.run_upper(_numpy(hidden, dtype))
            graphs.advance(length)
            report.add("lower", step, lower, {io_names.CUTOFF_HIDDEN: hidden})
            report.add("upper", step, upper, {io_names.LOGITS: model.lm_head_rows(final), io_names.TOP_HIDDEN: top})
            tops = torch.cat([tops, top.to(tops.dtype)], dim=1)
            # draft head on the exact state of the chunk's last position, with the exact top state before it
            # (an attending adapter: on every position of the chunk, filling its cache; the last row compared)
            prevs = torch.nn.functional.pad(tops[:, :-1], (0, 0, 1, 0))[:, -length:]  # f(t-1) of the chunk's rows
            rows = slice(None) if adapter_cache is not None else slice(-1, None)
            first = _check_draft_head(model, graphs, report, step, hidden[:, rows], prevs[:, rows], exit_layer, dtype,
                                      adapter_cache)
            # one aligned step from there: drafter, then the draft head on its pseudo state, chained
            token = tokens[total + index]
            pseudo = model.align(torch.tensor([[int(token)]], device=device), hidden[:, -1:], exit_layer)
            drafter = graphs.run_drafter(np.array([[token]], dtype=np.int64), _numpy(hidden[:, -1:], dtype))
            report.add("drafter", step, drafter, {io_names.PSEUDO_HIDDEN: pseudo})
            _check_draft_head(model, graphs, report, f"{step}/chained", pseudo, first, exit_layer, dtype, adapter_cache)
            if adapter_cache is not None:  # the chained entry is a drafted one: drop it, as commit does
                adapter_cache.rewind_to(adapter_cache.length - 1)
                graphs.adapter_length -= 1
    return report


def _check_draft_head(
    model: SpAFModel, graphs: GraphSessions, report: GraphParityReport, step: str,
    hidden: torch.Tensor, prev_top: torch.Tensor, exit_layer: int, dtype: str, adapter_cache: Any = None,
) -> torch.Tensor:
    """Compare one draft-head call on rows [1, S, H] (S = 1 unless the adapter attends, then at the
    positions after ``adapter_cache``'s); return PyTorch's drafted top state of the last row. [1, 1, H]"""
    reads_top = model.reads_top_state(exit_layer)
    offset = adapter_cache.length if adapter_cache is not None else 0
    logits, drafted = model.draft_step(hidden, exit_layer, prev_top if reads_top else None, offset, adapter_cache)
    logits, drafted = logits[:, -1:], drafted[:, -1:]
    actual = graphs.run_draft_head(_numpy(hidden, dtype), _numpy(prev_top, dtype) if reads_top else None)
    report.add("draft_head", step, actual, {io_names.DRAFT_LOGITS: logits, io_names.DRAFTED_TOP: drafted})
    return drafted


class GraphSessions:
    """The graphs of an export with preallocated, in-place KV caches (batch 1)."""

    def __init__(self, folder: Path, manifest: Manifest, provider: str) -> None:
        import onnxruntime as ort

        self.shared = SharedWeights(folder)
        self.dtype = np.dtype(manifest.dtype)
        sizes = manifest.sizes
        self.embeddings = EmbeddingTable(folder / io_names.EMBEDDINGS, sizes.vocab_size, sizes.hidden_size, self.dtype,
                                         manifest.quantization)
        kv_shape = (1, sizes.num_kv_heads, sizes.max_length, sizes.head_dim)
        self.length = 0  # valid cache rows (P), the same in both stacks

        def caches(layers: Sequence[int | str], shape: tuple[int, ...] = kv_shape) -> dict[str, Any]:
            values = {}
            for past_k, past_v, present_k, present_v in io_names.kv_names(layers):
                for past, present in ((past_k, present_k), (past_v, present_v)):
                    values[(past, present)] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype))
            return values

        k = manifest.cutoff_layer
        self.lower, self.upper, self.drafter, self.draft_head = (
            open_shared_session(self.shared, graph, provider=resolve_provider(provider))
            for graph in (io_names.LOWER_GRAPH, io_names.UPPER_GRAPH, io_names.DRAFTER_GRAPH,
                          io_names.DRAFT_HEAD_GRAPH)
        )
        self.lower_kv = caches(range(0, k))
        self.upper_kv = caches(range(k, sizes.num_layers))
        self.adapter_kv = None  # an attending adapter's cache, its own length
        self.adapter_length = 0
        if manifest.adapter_attention:
            attention = manifest.adapter_attention
            shape = (1, attention["num_heads"], sizes.max_length, attention["head_dim"])
            self.adapter_kv = caches([io_names.ADAPTER_KV], shape)

    def rewind_to(self, length: int) -> None:
        self.length = length

    def advance(self, rows: int) -> None:
        self.length += rows

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [1, S] -> their rows of embeddings.bin [1, S, H], as the engine reads them."""
        return self.embeddings.rows(ids[0])[None]

    def run_lower(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """ids: [1, S] -> cutoff states of the lower graph on their embedding rows."""
        feeds = {io_names.INPUTS_EMBEDS: self.embed(ids)}
        return self._run_stack(self.lower, self.lower_kv, feeds, [io_names.CUTOFF_HIDDEN])

    def run_upper(self, hidden: np.ndarray, num_logits: int | None = None) -> dict[str, np.ndarray]:
        """hidden: [1, S, H]; logits of the last ``num_logits`` positions (default all S)."""
        count = np.array([hidden.shape[1] if num_logits is None else num_logits], dtype=np.int64)  # [1]
        return self._run_stack(self.upper, self.upper_kv, {io_names.CUTOFF_HIDDEN: hidden, io_names.NUM_LOGITS: count},
                               [io_names.LOGITS, io_names.TOP_HIDDEN])

    def run_drafter(self, token_ids: np.ndarray, prev_hidden: np.ndarray) -> dict[str, np.ndarray]:
        names = [io_names.PSEUDO_HIDDEN]
        feeds = {io_names.TOKEN_EMBEDS: self.embed(token_ids), io_names.PREV_HIDDEN: prev_hidden}
        values = self.drafter.run(names, feeds)
        return dict(zip(names, values))

    def run_draft_head(self, hidden: np.ndarray, prev_top: np.ndarray | None) -> dict[str, np.ndarray]:
        """hidden, prev_top: [1, S, H] (``prev_top`` None for adapters that do not read it; S = 1 unless
        the adapter attends, whose cache then advances by S)."""
        names = [io_names.DRAFT_LOGITS, io_names.DRAFTED_TOP]
        feeds = {io_names.DRAFT_HIDDEN: hidden}
        if prev_top is not None:
            feeds[io_names.PREV_TOP] = prev_top
        if self.adapter_kv is None:
            return dict(zip(names, self.draft_head.run(names, feeds)))
        outputs = self._run_cached(self.draft_head, self.adapter_kv, feeds, names, self.adapter_length)
        self.adapter_length += hidden.shape[1]
        return outputs

    def _run_stack(self, session, kv, feeds, outputs) -> dict[str, np.ndarray]:
        """Positions ``length .. length+S-1`` as a chain; the caller advances ``length`` once both stacks ran."""
        hidden = next(iter(feeds.values()))  # [1, S, H]
        if io_names.TREE_POSITIONS in {arg.name for arg in session.get_inputs()}:  # format 6: a chain's tree inputs
            count = hidden.shape[1]
            positions = np.arange(self.length, self.length + count, dtype=np.int64)[None]  # [1, S]
            feeds = {**feeds, io_names.TREE_POSITIONS: positions,
                     io_names.TREE_BIAS: np.zeros((1, 1, count, count), dtype=hidden.dtype)}
        return self._run_cached(session, kv, feeds, outputs, self.length)

    def _run_cached(self, session, kv, feeds, outputs, past_length: int) -> dict[str, np.ndarray]:
        """A graph with a KV cache of ``past_length`` valid rows on the new positions after them."""
        length = next(iter(feeds.values())).shape[1]  # S new positions
        binding = session.io_binding()
        feeds = dict(feeds)
        feeds[io_names.SEQLENS_K] = np.array([past_length + length - 1], dtype=np.int32)
        feeds[io_names.TOTAL_SEQUENCE_LENGTH] = np.array(past_length + length, dtype=np.int32)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for (past, present), value in kv.items():  # one buffer: GQA writes the new rows in place
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        for name in outputs:
            binding.bind_output(name)
        session.run_with_iobinding(binding)
        results = binding.get_outputs()
        return {name: results[len(kv) + i].numpy() for i, name in enumerate(outputs)}


def compare(graph: str, output: str, step: str, actual: np.ndarray, expected: torch.Tensor) -> OutputError:
    reference = expected.detach().to(torch.float32).cpu().numpy()
    actual = actual.astype(np.float32)
    if actual.shape != reference.shape:
        raise AssertionError(f"{graph}.{output} at {step}: shape {actual.shape} != PyTorch {reference.shape}")
    diff = np.abs(actual - reference)
    max_abs = float(diff.max())
    scale = float(np.abs(reference).max()) or 1.0
    top1 = None
    if output in LOGIT_OUTPUTS:
        top1 = float(np.mean(actual.argmax(-1) == reference.argmax(-1)))
    return OutputError(graph, output, step, max_abs, max_abs / scale, top1)


def _numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy().astype(dtype)
