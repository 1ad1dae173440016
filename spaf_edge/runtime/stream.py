"""Incremental detokenization: text pieces from a growing token list.

A token may end in the middle of a multi-byte UTF-8 character (byte-level BPE splits
emoji and CJK characters across tokens); its text is held back until the character is
complete. Each step decodes only a short window of recent tokens, and both decodes of a
step start at the same token, so tokenizer quirks at a window's start (e.g. a stripped
leading space) cancel out: the pieces always join to the full decode. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what decoders emit for an incomplete UTF-8 sequence


class IncrementalDecoder:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode  # token ids -> text (special tokens already skipped)
        self.tokens: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been emitted

    def add(self, tokens: Sequence[int]) -> str:
        """Append tokens; return the text that is now complete (may be empty)."""
        self.tokens.extend(tokens)
        before = self.decode(self.tokens[self.prefix:self.read])
        after = self.decode(self.tokens[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return after[len(before):]

    def flush(self) -> str:
        """The held-back rest, even if incomplete (at the end of a generation)."""
        if self.read == len(self.tokens):
            return ""
        before = self.decode(self.tokens[self.prefix:self.read])
        after = self.decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return after[len(before):]
