"""A preallocated KV cache for a contiguous range of decoder layers (PyTorch side).

Written by position: ``update`` stores a step's keys/values at ``length .. length+S``
for one layer and returns the valid prefix; the owner calls ``advance(S)`` once the
whole stack has run. Rollback is ``rewind_to(n)``: nothing is copied or freed, stale
rows are overwritten by the next step. It quacks like a transformers ``Cache`` for the
one method decoder layers call.
"""

from __future__ import annotations

from typing import Any

import torch

from spaf_edge.core.cache_length import CacheLength


class StackKVCache(CacheLength):
    def __init__(
        self,
        layer_ids: range,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(max_length)
        shape = (1, num_kv_heads, max_length, head_dim)  # [B=1, kv_heads, max_len, head_dim]
        self.layer_ids = layer_ids
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        # key, value: [1, kv_heads, S, head_dim] -> cached [1, kv_heads, length+S, head_dim]
        self.check_room(key.shape[2])
        end = self.length + key.shape[2]
        self.keys[layer_idx][:, :, self.length:end] = key
        self.values[layer_idx][:, :, self.length:end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def keep_rows(self, start: int, rows: list[int]) -> None:
        """Move the entries at ``start + rows`` (ascending) to ``start, start+1, ..`` in every layer
        and keep ``start + len(rows)`` entries: a draft tree's accepted path put in place."""
        source = torch.tensor([start + row for row in rows], device=next(iter(self.keys.values())).device)
        for layer in self.layer_ids:
            for buffer in (self.keys[layer], self.values[layer]):
                buffer[:, :, start:start + len(rows)] = buffer[:, :, source]
        self.rewind_to(start + len(rows))
