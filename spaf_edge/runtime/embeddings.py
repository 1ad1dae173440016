"""Token embedding rows read from ``embeddings.bin`` with positioned reads. Torch-free.

No graph gathers from the embedding table (export format 4): the engine copies the rows
of the tokens it feeds into a host buffer. A ``Gather`` on a memory-mapped table makes
whole page-cache folios resident (about 2 MB per touched row on Linux with file THP,
docs/exporter.md), so a few hundred distinct tokens map most of the table; a read copies
only the row's bytes and leaves the rest in the (reclaimable) page cache. That is what
lets the tied LM head live once, prepacked, in ``upper.onnx``.

Quantized rows are dequantized on the way out, which costs more than the read; the table
keeps the dequantized rows of recent tokens (at most :data:`ROW_CACHE_BYTES`), since a
generation reads the same tokens over and over.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spaf_edge.core.embedding_layout import EmbeddingLayout
from spaf_edge.core.errors import ExportFormatError
from spaf_edge.core.manifest import check_embedding_file

ROW_CACHE_BYTES = 4 << 20  # dequantized rows kept per quantized table (emptied when full)


class EmbeddingTable:
    """The ``[V, H]`` rows of ``path`` (``dtype``, raw or quantized: ``quantization``); :meth:`lookup` copies
    (and dequantizes) rows out."""

    def __init__(
        self, path: str | Path, vocab_size: int, hidden_size: int, dtype: type, quantization: str | None = None
    ) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.dtype = np.dtype(dtype)
        self.layout = EmbeddingLayout.for_export(vocab_size, hidden_size, self.dtype.name, quantization)
        self.row_bytes = self.layout.row_bytes
        check_embedding_file(self.path, self.layout)
        self._file = open(self.path, "rb", buffering=0)  # unbuffered: reads go straight into the rows
        self._fd = self._file.fileno()
        self._cache: dict[int, np.ndarray] = {}  # token -> its dequantized row [H] (quantized tables only)
        self._cache_rows = max(1, ROW_CACHE_BYTES // (hidden_size * self.dtype.itemsize))

    def lookup(self, token_ids: Sequence[int], out: np.ndarray) -> np.ndarray:
        """Rows of ``token_ids`` into ``out`` [n, H] (C-contiguous, the table's dtype). Returns ``out``."""
        if self.layout.quantized:
            return self._lookup_quantized(token_ids, out)
        rows = memoryview(out).cast("B")
        for index, token in enumerate(token_ids):
            start = index * self.row_bytes
            self._read_row(int(token), rows[start : start + self.row_bytes])
        return out

    def _lookup_quantized(self, token_ids: Sequence[int], out: np.ndarray) -> np.ndarray:
        cache = self._cache
        missing = []  # (index in token_ids, token) of rows not cached
        for index, token in enumerate(token_ids):
            row = cache.get(token)
            if row is None:
                missing.append((index, int(token)))
            else:
                out[index] = row
        if not missing:
            return out
        layout, n = self.layout, len(missing)
        packed = np.empty((n, layout.row_bytes), dtype=np.uint8)
        scales = np.empty((n, layout.blocks), dtype=self.dtype)
        for slot, (_, token) in enumerate(missing):
            self._read_row(token, memoryview(packed[slot]))
            self._read(layout.scales_offset + token * layout.scale_bytes, memoryview(scales[slot]).cast("B"), token)
        rows = layout.dequantize(packed, scales, np.empty((n, self.hidden_size), dtype=self.dtype))
        keep = n <= self._cache_rows  # a long prompt's rows are not kept
        if keep and len(cache) + n > self._cache_rows:
            cache.clear()
        for slot, (index, token) in enumerate(missing):
            out[index] = rows[slot]
            if keep:
                cache[token] = rows[slot]
        return out

    def rows(self, token_ids: Sequence[int]) -> np.ndarray:
        """A new [n, H] array holding the rows of ``token_ids``."""
        return self.lookup(token_ids, np.empty((len(token_ids), self.hidden_size), self.dtype))

    def _read_row(self, token: int, target: memoryview) -> None:
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary 0..{self.vocab_size - 1}")
        self._read(token * self.row_bytes, target, token)

    def _read(self, offset: int, target: memoryview, token: int) -> None:
        """Fill ``target`` from ``offset`` of the file (part of ``token``'s row)."""
        if hasattr(os, "preadv"):
            count = os.preadv(self._fd, [target], offset)
        else:  # Windows: no positioned reads in os
            self._file.seek(offset)
            count = self._file.readinto(target)
        if count != len(target):
            raise ExportFormatError(f"{self.path} ended inside row {token}: re-run `spaf-edge export`.")

    def close(self) -> None:
        self._file.close()
