"""Preallocated KV caches on the execution provider's device, bound in place.

Each layer gets one key and one value buffer of ``[1, kv_heads, max_length, head_dim]``,
allocated once. The same OrtValue is bound as the graph's past input AND its present
output, so GroupQueryAttention writes a step's rows into it in place: a decode step
copies no cache. The valid length lives here, in Python; rollback is ``rewind_to(n)``
and the next call simply passes the shorter length (stale rows are never read and get
overwritten). After a draft tree's verify pass, :meth:`KVCache.compact` moves the accepted
path's entries to consecutive positions. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from spaf_edge.core.cache_length import CacheLength
from spaf_edge.core.io_names import kv_names


class KVCache(CacheLength):
    def __init__(
        self, layers: Sequence[int | str], num_kv_heads: int, head_dim: int, max_length: int, dtype: type,
        device: str = "cpu",
    ) -> None:
        super().__init__(max_length)
        self.layers = layers
        self.device = device
        self.shape = [1, num_kv_heads, max_length, head_dim]  # [B=1, kv_heads, max_length, head_dim]
        self.dtype = np.dtype(dtype)
        # Uninitialised on purpose: rows past the valid length are never read, and untouched
        # pages of a long context cost no resident memory.
        self.keys = [ort.OrtValue.ortvalue_from_shape_and_type(self.shape, dtype, device, 0) for _ in layers]
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type(self.shape, dtype, device, 0) for _ in layers]

    def bind(self, binding: ort.IOBinding) -> None:
        """Bind every layer's buffer as both past input and present output of ``binding``."""
        names = kv_names(self.layers)
        for (past_k, past_v, present_k, present_v), key, value in zip(names, self.keys, self.values):
            binding.bind_ortvalue_input(past_k, key)
            binding.bind_ortvalue_input(past_v, value)
            binding.bind_ortvalue_output(present_k, key)
            binding.bind_ortvalue_output(present_v, value)

    def rows(self, layer: int | str, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's valid key and value rows: [1, kv_heads, length, head_dim] each."""
        index = self.layers.index(layer)
        length = self.length if length is None else length
        return self.keys[index].numpy()[:, :, :length].copy(), self.values[index].numpy()[:, :, :length].copy()

    def compact(self, rows: Sequence[int]) -> None:
        """Commit the entries of call rows ``rows`` (ascending) at the next positions, then advance past them.

        Row ``r`` is the entry at position ``length + r`` (a tree call's rows start at the valid
        length); ``rows[i]`` moves to ``length + i`` in every layer's key and value buffer, in
        place, and the valid length grows by ``len(rows)``. For a tree: rewind to the committed
        length ``T``, then ``compact(accepted path's rows)`` (the root is row 0).
        """
        rows = np.asarray(rows, dtype=np.int64)
        start = self.length
        if len(rows) and ((rows[0] < 0) or (np.diff(rows) <= 0).any() or start + rows[-1] >= self.max_length):
            raise ValueError(f"rows {rows.tolist()} must ascend inside the cache (valid length {start})")
        moved = np.flatnonzero(rows != np.arange(len(rows)))  # the prefix already in place stays
        if len(moved):
            if self.device != "cpu":
                raise NotImplementedError(
                    f"Moving KV rows on device {self.device!r} is not implemented yet (only on the CPU): verify "
                    "chains there, or run the engine on the CPU provider."
                )
            source, target = start + rows[moved], start + moved  # target < source: a gather before the write
            for buffer in (*self.keys, *self.values):
                array = buffer.numpy()  # [1, kv_heads, max_length, head_dim], a view of the CPU buffer
                array[:, :, target] = array[:, :, source]
        self.advance(len(rows))

    @property
    def nbytes(self) -> int:
        return 2 * len(self.layers) * int(np.prod(self.shape)) * self.dtype.itemsize
