"""The four export graphs behind persistent IOBindings (docs/export_format.md, "Graph IO").

Each wrapper owns one session and one IOBinding. KV buffers and fixed-size outputs are
bound once; per call only the few small inputs and the row views of host buffers that
change with the chunk size are rebound, from cached OrtValues. On the CPU provider every
host buffer is shared with ONNX Runtime without copies; on device providers ORT copies
the small inputs in and the outputs out (hidden states and logits: a few KB per step),
while the KV caches never leave the device. Torch-free.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from spaf_edge.io_names import (
    CUTOFF_HIDDEN,
    DRAFT_HIDDEN,
    DRAFT_LOGITS,
    DRAFTED_TOP,
    INPUTS_EMBEDS,
    LOGITS,
    NUM_LOGITS,
    PREV_HIDDEN,
    PREV_TOP,
    PSEUDO_HIDDEN,
    SEQLENS_K,
    TOKEN_EMBEDS,
    TOP_HIDDEN,
    TOTAL_SEQUENCE_LENGTH,
)
from spaf_edge.runtime.kv import KVCache


class HostBuffer:
    """A host array ``[1, rows, ...]`` with cached OrtValues viewing its row ranges (no copies)."""

    def __init__(self, shape: tuple[int, ...], dtype: type) -> None:
        self.array = np.zeros(shape, dtype=dtype)
        self._views: dict[tuple[int, int], ort.OrtValue] = {}

    @property
    def rows(self) -> int:
        return self.array.shape[1]

    def view(self, start: int, stop: int) -> ort.OrtValue:
        """OrtValue over ``array[:, start:stop]`` (contiguous: the leading axis has size 1)."""
        value = self._views.get((start, stop))
        if value is None:
            value = ort.OrtValue.ortvalue_from_numpy(self.array[:, start:stop])
            self._views[(start, stop)] = value
        return value


class _Positions:
    """The GroupQueryAttention length inputs of a call: ``seqlens_k = P+S-1``, ``total = P+S``."""

    def __init__(self) -> None:
        self.seqlens = np.zeros(1, dtype=np.int32)  # [1]
        self.total = np.zeros((), dtype=np.int32)  # []
        self.seqlens_value = ort.OrtValue.ortvalue_from_numpy(self.seqlens)
        self.total_value = ort.OrtValue.ortvalue_from_numpy(self.total)

    def bind(self, binding: ort.IOBinding, past: int, new: int) -> None:
        self.seqlens[0] = past + new - 1
        self.total[()] = past + new
        # Rebinding is free on CPU and makes device providers copy the fresh values.
        binding.bind_ortvalue_input(SEQLENS_K, self.seqlens_value)
        binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self.total_value)


class StackGraph:
    """A decoder stack with its own KV cache: ``lower.onnx`` or ``upper.onnx``."""

    def __init__(self, session: ort.InferenceSession, kv: KVCache) -> None:
        self.session = session
        self.kv = kv
        self.binding = session.io_binding()
        kv.bind(self.binding)
        self.positions = _Positions()

    def _run(self, new: int) -> None:
        self.positions.bind(self.binding, self.kv.length, new)
        self.session.run_with_iobinding(self.binding)
        self.kv.advance(new)


class LowerGraph(StackGraph):
    """Layers ``0..k-1`` on embedding rows: cutoff states."""

    def run(self, inputs_embeds: ort.OrtValue, new: int, cutoff_hidden: ort.OrtValue) -> None:
        # inputs_embeds: [1, S, H] -> cutoff_hidden: [1, S, H]
        self.binding.bind_ortvalue_input(INPUTS_EMBEDS, inputs_embeds)
        self.binding.bind_ortvalue_output(CUTOFF_HIDDEN, cutoff_hidden)
        self._run(new)


class UpperGraph(StackGraph):
    """Layers ``k..L-1`` + final norm + LM head: top states of every position, logits of the last few."""

    def __init__(self, session: ort.InferenceSession, kv: KVCache) -> None:
        super().__init__(session, kv)
        self.num_logits = np.zeros(1, dtype=np.int64)  # [1]
        self.num_logits_value = ort.OrtValue.ortvalue_from_numpy(self.num_logits)

    def run(
        self, cutoff_hidden: ort.OrtValue, new: int, logits: ort.OrtValue, top_hidden: ort.OrtValue, num_logits: int
    ) -> None:
        # cutoff_hidden: [1, S, H] -> logits: [1, n, V] float32 (last n = num_logits positions), top_hidden: [1, S, H]
        self.num_logits[0] = num_logits
        self.binding.bind_ortvalue_input(NUM_LOGITS, self.num_logits_value)  # rebound: device providers copy it
        self.binding.bind_ortvalue_input(CUTOFF_HIDDEN, cutoff_hidden)
        self.binding.bind_ortvalue_output(LOGITS, logits)
        self.binding.bind_ortvalue_output(TOP_HIDDEN, top_hidden)
        self._run(new)


class DrafterGraph:
    """One aligned-draft step: ``ĥ = AH(e(d), h̄)``. No KV cache."""

    def __init__(self, session: ort.InferenceSession, token_embeds: np.ndarray) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.token_embeds = token_embeds  # [1, 1, H] e(d), written by the caller before run()
        self.token_value = ort.OrtValue.ortvalue_from_numpy(token_embeds)

    def run(self, prev_hidden: ort.OrtValue, pseudo_hidden: ort.OrtValue) -> None:
        # token_embeds: [1, 1, H], prev_hidden: [1, 1, H] -> pseudo_hidden: [1, 1, H]
        self.binding.bind_ortvalue_input(TOKEN_EMBEDS, self.token_value)  # rebound: device providers copy it
        self.binding.bind_ortvalue_input(PREV_HIDDEN, prev_hidden)
        self.binding.bind_ortvalue_output(PSEUDO_HIDDEN, pseudo_hidden)
        self.session.run_with_iobinding(self.binding)


class DraftHeadGraph:
    """One draft step's head: ``f' = final_norm(a(h̄, f))`` and its draft logits.

    ``reads_top_state``: the graph has a ``prev_top`` input (the adapter reads ``f``);
    otherwise ``prev_top`` passed to :meth:`run` is ignored. ``kv``: the KV cache of an
    attending adapter (None for other kinds); the graph then takes rows at the positions
    after the cache's and outputs the last row's draft.
    """

    def __init__(
        self, session: ort.InferenceSession, draft_logits: ort.OrtValue, reads_top_state: bool,
        kv: KVCache | None = None,
    ) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.reads_top_state = reads_top_state
        self.kv = kv
        self.binding.bind_ortvalue_output(DRAFT_LOGITS, draft_logits)  # [1, 1, V_d]
        if kv is not None:
            kv.bind(self.binding)
            self.positions = _Positions()

    def run(self, draft_hidden: ort.OrtValue, prev_top: ort.OrtValue, drafted_top: ort.OrtValue, new: int = 1) -> None:
        # draft_hidden, prev_top: [1, S, H] (S = new: 1 unless the adapter attends)
        #   -> draft logits of the last row (bound buffer), drafted_top: [1, 1, H]
        self.binding.bind_ortvalue_input(DRAFT_HIDDEN, draft_hidden)
        if self.reads_top_state:
            self.binding.bind_ortvalue_input(PREV_TOP, prev_top)
        self.binding.bind_ortvalue_output(DRAFTED_TOP, drafted_top)
        if self.kv is not None:
            self.positions.bind(self.binding, self.kv.length, new)
        self.session.run_with_iobinding(self.binding)
        if self.kv is not None:
            self.kv.advance(new)
