"""Load-time check: every graph input/output the engine binds exists with the manifest's sizes.

A graph and a manifest from different exports (or a hand-edited manifest) then fail at
load with a message naming the mismatch, instead of a shape error deep inside a run.
Symbolic (dynamic) axes in a graph are accepted; a graph input the engine would not bind
(e.g. a ``prev_top`` the manifest does not announce) is a mismatch too. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from spaf_edge.core.errors import ExportFormatError
from spaf_edge.core.io_names import (
    ADAPTER_KV,
    CUTOFF_HIDDEN,
    DRAFT_HEAD_GRAPH,
    DRAFT_HIDDEN,
    DRAFT_LOGITS,
    DRAFTED_TOP,
    DRAFTER_GRAPH,
    INPUTS_EMBEDS,
    LOGITS,
    LOWER_GRAPH,
    NUM_LOGITS,
    PREV_HIDDEN,
    PREV_TOP,
    PSEUDO_HIDDEN,
    SEQLENS_K,
    TOKEN_EMBEDS,
    TOP_HIDDEN,
    TOTAL_SEQUENCE_LENGTH,
    TREE_BIAS,
    TREE_POSITIONS,
    UPPER_GRAPH,
    kv_names,
)
from spaf_edge.core.manifest import Manifest

# ORT type strings of graph IO -> numpy dtypes.
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class Expected:
    """One graph input or output the engine binds: its dtype and sizes (None: any size)."""

    name: str
    dtype: type
    shape: Sequence[int | None]


def expected_io(manifest: Manifest, dtype: type) -> dict[str, tuple[list[Expected], list[Expected]]]:
    """(inputs, outputs) the engine binds, per graph file, with the sizes the manifest implies."""
    sizes = manifest.sizes
    k, hidden = manifest.cutoff_layer, sizes.hidden_size
    positions = [Expected(SEQLENS_K, np.int32, [1]), Expected(TOTAL_SEQUENCE_LENGTH, np.int32, [])]
    # format 6: the stacks' tree inputs (a format-5 stack has none, and then must not have them)
    tree = [Expected(TREE_POSITIONS, np.int64, [1, None]), Expected(TREE_BIAS, dtype, [1, 1, None, None])]
    tree = tree if manifest.tree_attention else []

    def kv(layers: Sequence[int | str], shape: list[int] | None = None) -> tuple[list[Expected], list[Expected]]:
        shape = shape or [1, sizes.num_kv_heads, sizes.max_length, sizes.head_dim]
        names = kv_names(layers)
        past = [Expected(name, dtype, shape) for pk, pv, _, _ in names for name in (pk, pv)]
        present = [Expected(name, dtype, shape) for _, _, ck, cv in names for name in (ck, cv)]
        return past, present

    lower_past, lower_present = kv(range(0, k))
    upper_past, upper_present = kv(range(k, sizes.num_layers))
    attention = manifest.adapter_attention
    rows = None if attention else 1  # an attending adapter's draft head takes [1, S, H]
    top = [Expected(PREV_TOP, dtype, [1, rows, hidden])] if manifest.reads_top_state else []
    adapter_past: list[Expected] = []
    adapter_present: list[Expected] = []
    if attention:
        adapter_past, adapter_present = kv([ADAPTER_KV], [1, attention["num_heads"], sizes.max_length,
                                                          attention["head_dim"]])
        adapter_past = [*positions, *adapter_past]
    return {
        LOWER_GRAPH: (
            [Expected(INPUTS_EMBEDS, dtype, [1, None, hidden]), *positions, *tree, *lower_past],
            [Expected(CUTOFF_HIDDEN, dtype, [1, None, hidden]), *lower_present],
        ),
        UPPER_GRAPH: (
            [Expected(CUTOFF_HIDDEN, dtype, [1, None, hidden]), Expected(NUM_LOGITS, np.int64, [1]), *positions,
             *tree, *upper_past],
            [Expected(LOGITS, np.float32, [1, None, sizes.vocab_size]), Expected(TOP_HIDDEN, dtype, [1, None, hidden]),
             *upper_present],
        ),
        DRAFTER_GRAPH: (
            [Expected(TOKEN_EMBEDS, dtype, [1, 1, hidden]), Expected(PREV_HIDDEN, dtype, [1, 1, hidden])],
            [Expected(PSEUDO_HIDDEN, dtype, [1, 1, hidden])],
        ),
        DRAFT_HEAD_GRAPH: (
            [Expected(DRAFT_HIDDEN, dtype, [1, rows, hidden]), *top, *adapter_past],
            [Expected(DRAFT_LOGITS, np.float32, [1, 1, sizes.draft_vocab_size]),
             Expected(DRAFTED_TOP, dtype, [1, 1, hidden]), *adapter_present],
        ),
    }


def check_graphs(folder: Path, manifest: Manifest, dtype: type, sessions: dict[str, ort.InferenceSession]) -> None:
    """Check each graph file's session (keyed by file name) against :func:`expected_io`."""
    for name, (inputs, outputs) in expected_io(manifest, dtype).items():
        check_io(sessions[name], folder / name, inputs, outputs)


def check_io(session: ort.InferenceSession, path: Path, inputs: list[Expected], outputs: list[Expected]) -> None:
    """Raise ExportFormatError when the graph's IO disagrees with ``inputs``/``outputs``."""
    problems = []
    sides = (("input", inputs, session.get_inputs()), ("output", outputs, session.get_outputs()))
    for kind, expected_list, args in sides:
        actual = {arg.name: arg for arg in args}
        for expected in expected_list:
            arg = actual.get(expected.name)
            if arg is None:
                problems.append(f"{kind} {expected.name!r} is missing")
                continue
            if ORT_DTYPES.get(arg.type) is not expected.dtype:
                problems.append(f"{kind} {expected.name!r} is {arg.type}, expected {np.dtype(expected.dtype).name}")
            problems.extend(_shape_problems(kind, expected, arg.shape))
    bound = {expected.name for expected in inputs}
    overridable = {arg.name for arg in session.get_overridable_initializers()}
    problems += [f"input {arg.name!r} is not one the manifest announces" for arg in session.get_inputs()
                 if arg.name not in bound and arg.name not in overridable]
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ExportFormatError(
            f"{path} does not match its manifest: {'; '.join(problems[:4])}{more}. The graph and the manifest "
            "come from different exports (or the manifest was edited): re-run `spaf-edge export`."
        )


def _shape_problems(kind: str, expected: Expected, shape: Sequence[int | str | None]) -> list[str]:
    if len(shape) != len(expected.shape):
        return [f"{kind} {expected.name!r} has rank {len(shape)}, expected {len(expected.shape)}"]
    return [
        f"{kind} {expected.name!r} has size {dim} on axis {axis} where the manifest implies {want}"
        for axis, (dim, want) in enumerate(zip(shape, expected.shape))
        if want is not None and isinstance(dim, int) and dim != want
    ]
