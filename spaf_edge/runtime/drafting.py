"""The SpAF drafter's graph calls on the engine's host buffers (:class:`spaf_edge.decoding.spaf.DraftCalls`).

A state handle is a buffer row ``(HostBuffer, row)``; ONNX Runtime reads and writes the
rows in place through cached OrtValue views, so a draft step copies no state:

- a serial draft ``j`` writes the exact ``h(T+j-1)`` into ``hidden`` row ``j-1``, where the
  verify pass's lower call continues; an aligned one writes ``ĥ(T+j-1)`` into ``pseudo`` row ``j-1``;
- the draft head of draft ``j`` writes its drafted top state into ``prev_tops`` row ``j`` (row 0
  holds the exact ``f(T-1)``), and a chain of aligned drafts starts from ``chain_top``;
- an attending adapter's queued rows are copies in ``adapter_hidden`` / ``adapter_prev``.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from spaf_edge.decoding.spaf import CHAIN_START
from spaf_edge.runtime.buffers import HostBuffer, HostBuffers
from spaf_edge.runtime.decoder import Decoder
from spaf_edge.runtime.graphs import DrafterGraph, DraftHeadGraph

Row = tuple[HostBuffer, int]


def view(row: Row) -> ort.OrtValue:
    buffer, index = row
    return buffer.view(index, index + 1)


class EngineDraftCalls:
    """Draft-step graph calls of one engine: the drafter, the draft head and its optional KV cache."""

    def __init__(
        self, decoder: Decoder, drafter: DrafterGraph, draft_head: DraftHeadGraph, draft_vocab: np.ndarray | None,
    ) -> None:
        self.decoder = decoder
        self.drafter, self.draft_head = drafter, draft_head
        self.draft_vocab = draft_vocab  # int64 [V_d] token ids, None = every token
        self.vocab_size = decoder.vocab_size
        self.attends = draft_head.kv is not None
        self._queued = 0

    @property
    def buffers(self) -> HostBuffers:
        return self.decoder.buffers  # looked up per call: growing the buffers replaces them

    @property
    def position(self) -> int:
        return self.decoder.position

    @property
    def pending(self) -> int:
        return self.decoder.tokens[-1]

    def exact_hidden(self) -> Row:
        return self.buffers.prev_hidden, 0

    def exact_top(self) -> Row:
        return self.buffers.prev_tops, 0

    def exact_top2(self) -> Row:
        return self.buffers.prev_top2, 0

    def row_states(self, row: int, before: int | None) -> tuple[Row, Row]:
        buffers = self.buffers
        return (buffers.hidden, row), ((buffers.prev_tops, 0) if before is None else (buffers.top_hidden, before))

    def serial(self, token: int, j: int) -> Row:
        self.decoder.run_lower([token], row=j - 1)
        return self.buffers.hidden, j - 1

    def align(self, token: int, hidden: Row, j: int) -> Row:
        buffers = self.buffers
        self.decoder.embeddings.lookup([token], buffers.token_embeds.array[0])
        self.drafter.run(buffers.token_embeds.view(0, 1), view(hidden), buffers.pseudo.view(j - 1, j))
        return buffers.pseudo, j - 1

    def head(self, hidden: Row, previous: Row, slot: int) -> tuple[np.ndarray, Row]:
        out = self._slot(slot)
        self.draft_head.run(view(hidden), view(previous), view(out))
        return self.buffers.draft_logits[0, 0], out

    # ---- an attending adapter's cache ------------------------------------
    @property
    def adapter_length(self) -> int:
        return self.draft_head.kv.length

    @property
    def queued(self) -> int:
        return self._queued

    def rewind_adapter(self, length: int) -> None:
        self.draft_head.kv.rewind_to(length)

    def drop_queue(self) -> None:
        self._queued = 0

    def queue(self, hidden: Row, previous: Row) -> None:
        buffers = self.buffers
        if self._queued == buffers.adapter_hidden.rows:  # full (steps without drafts queue on): compute them now
            self.run_queue(1)
        (source, row), (prev_source, prev_row) = hidden, previous
        buffers.adapter_hidden.array[:, self._queued] = source.array[:, row]
        buffers.adapter_prev.array[:, self._queued] = prev_source.array[:, prev_row]
        self._queued += 1

    def run_queue(self, slot: int) -> tuple[np.ndarray, Row]:
        rows, self._queued = self._queued, 0
        buffers, out = self.buffers, self._slot(slot)
        self.draft_head.run(buffers.adapter_hidden.view(0, rows), buffers.adapter_prev.view(0, rows), view(out), rows)
        return buffers.draft_logits[0, 0], out

    def reset(self) -> None:
        """Forget the current generation: an empty adapter cache and queue."""
        self._queued = 0
        if self.draft_head.kv is not None:
            self.draft_head.kv.reset()

    def _slot(self, slot: int) -> Row:
        return (self.buffers.chain_top, 0) if slot == CHAIN_START else (self.buffers.prev_tops, slot)
