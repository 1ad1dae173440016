"""Host arrays that ONNX Runtime reads and writes in place, viewed as cached OrtValues (no copies on CPU)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


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


class HostBuffers:
    """Host arrays the graphs read and write in place (shared with ORT on CPU, no copies).

    Row buffers have ``rows`` rows (a prefill chunk or a verify pass); the logits buffer has
    ``logit_rows`` (a verify pass's ``D+1``: prefill asks the upper graph for no logits).
    """

    def __init__(
        self, rows: int, logit_rows: int, hidden_size: int, vocab_size: int, draft_vocab_size: int, dtype: type
    ) -> None:
        self.embeds = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: embedding rows of the lower call's tokens
        self.hidden = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: exact cutoff states of T ..
        self.pseudo = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: AlignmentHead states
        self.logits = HostBuffer((1, logit_rows, vocab_size), np.float32)  # [1, R_l, V]
        self.top_hidden = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: the upper call's top states
        self.prev_tops = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: f(T-1), then drafted tops
        # Where a chain of aligned drafts only (s = 0) starts: h(T-1), f(T-2) and the drafted top of T-1
        self.prev_hidden = HostBuffer((1, 1, hidden_size), dtype)  # [1, 1, H]
        self.prev_top2 = HostBuffer((1, 1, hidden_size), dtype)  # [1, 1, H]
        self.chain_top = HostBuffer((1, 1, hidden_size), dtype)  # [1, 1, H]
        self.adapter_hidden = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: h of positions an attending
        self.adapter_prev = HostBuffer((1, rows, hidden_size), dtype)  # adapter has to (re)compute, and their f(t-1)
        self.draft_logits = np.zeros((1, 1, draft_vocab_size), dtype=np.float32)  # [1, 1, V_d]
        self.draft_logits_value = ort.OrtValue.ortvalue_from_numpy(self.draft_logits)  # bound once
        self.token_embeds = HostBuffer((1, 1, hidden_size), dtype)  # [1, 1, H]: the drafter's e(d_{j-1})

    @property
    def rows(self) -> int:
        return self.hidden.rows

    def ensure_rows(self, rows: int, logit_rows: int = 0) -> None:
        """Grow the row buffers to ``rows``, the logits to ``logit_rows`` (between generations: contents dropped)."""
        names = ("embeds", "hidden", "pseudo", "top_hidden", "prev_tops", "adapter_hidden", "adapter_prev")
        names = names if rows > self.rows else ()
        names += ("logits",) if logit_rows > self.logits.rows else ()
        for name in names:
            old: HostBuffer = getattr(self, name)
            size = logit_rows if name == "logits" else rows
            setattr(self, name, HostBuffer((1, size, *old.array.shape[2:]), old.array.dtype))
