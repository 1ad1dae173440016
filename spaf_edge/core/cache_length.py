"""The valid length of a preallocated KV cache: how both caches (torch and ORT) move.

Torch-free. Buffers are allocated once at ``max_length`` rows; a step writes rows
``length .. length+n-1`` and then ``advance(n)``; rollback of rejected drafts is
``rewind_to(n)``: stale rows are simply overwritten later.
"""

from __future__ import annotations


class CacheLength:
    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0  # valid rows: positions 0 .. length-1

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise RuntimeError(f"KV cache overflow: {self.length + n} > {self.max_length} positions")

    def advance(self, n: int) -> None:
        self.check_room(n)
        self.length += n

    def rewind_to(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
