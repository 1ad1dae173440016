"""Prompt-lookup proposals: draft branches copied from the text seen so far (DESIGN §4b).

Answers that quote their input (summaries, extraction, passage QA, code edits) repeat
runs of the prompt. :class:`NgramIndex` finds the last few tokens of the history earlier
in it and proposes what followed there, as in prompt-lookup decoding; it costs no model
call. The history is the prompt plus every committed token, the pending token ``x_T``
(the last bonus token) included, so a candidate continues after ``x_T``.

The index is a dict from each n-gram (``min_ngram <= n <= max_ngram``) to the positions
where it ends, built incrementally: ``extend`` costs O(new tokens x n-gram sizes), and a
query looks at no more than ``max_scan`` positions per n-gram size, whatever the history
length.

Candidates are deterministic drafts: in the tree they are point masses (DESIGN §4b), so
sampling stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spaf_edge.core.errors import ConfigError

Tokens = Sequence[int] | np.ndarray  # 1-D token ids
BULK = 16  # extend by more tokens than this through zip: 3x faster per token, slower for a few


class NgramIndex:
    """The history's n-grams and where they end; proposes continuations of its last tokens.

    ``candidates`` tries the longest suffix first: for ``n = max_ngram .. min_ngram`` it takes
    the last ``n`` tokens, visits their earlier occurrences from the most recent back
    (at most ``max_scan`` of them per ``n``), and copies the up to ``max_tokens`` tokens that
    followed each. Equal continuations, and one that is a prefix of another, are merged
    into one branch (the longer, at the place of the first found).
    """

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4, max_scan: int = 32) -> None:
        if not isinstance(min_ngram, int) or not isinstance(max_ngram, int) or not 1 <= min_ngram <= max_ngram:
            raise ConfigError(
                f"lookup n-gram sizes min_ngram={min_ngram}, max_ngram={max_ngram}: give integers with "
                "1 <= min_ngram <= max_ngram (defaults 1 and 4)."
            )
        if not isinstance(max_scan, int) or max_scan < 1:
            raise ConfigError(f"lookup max_scan={max_scan}: give an integer >= 1 (default 32).")
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self.max_scan = max_scan
        self._tokens: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions of its last token, ascending

    def reset(self, tokens: Tokens = ()) -> None:
        """Start a new history (the prompt at prefill)."""
        self._tokens = []
        self._ends = {}
        self.extend(tokens)

    def extend(self, tokens: Tokens) -> None:
        """Append committed tokens (accepted drafts and the bonus token)."""
        new = tokens.reshape(-1).tolist() if isinstance(tokens, np.ndarray) else [int(token) for token in tokens]
        if len(new) > BULK:
            self._index_bulk(new)
            return
        history, ends = self._tokens, self._ends
        for token in new:
            history.append(token)
            end = len(history) - 1
            tail = history[-self.max_ngram :]
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                key = tuple(tail[-n:])
                positions = ends.get(key)
                if positions is None:
                    ends[key] = [end]
                else:
                    positions.append(end)

    def _index_bulk(self, new: list[int]) -> None:
        """``extend`` for many tokens (a prompt): the same n-grams, each size's built by ``zip`` in C."""
        history, ends = self._tokens, self._ends
        start = len(history)  # first new position
        history.extend(new)
        for n in range(self.min_ngram, min(self.max_ngram, len(history)) + 1):
            first = max(start, n - 1)  # first new position an n-gram of this size ends at
            window = history[first - n + 1 :]
            for end, key in enumerate(zip(*(window[i:] for i in range(n))), start=first):
                positions = ends.get(key)
                if positions is None:
                    ends[key] = [end]
                else:
                    positions.append(end)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """A copy of the history."""
        return list(self._tokens)

    def candidates(self, max_tokens: int, max_branches: int) -> list[list[int]]:
        """Up to ``max_branches`` distinct continuations of the history, each 1..``max_tokens`` long.

        Ordered by match length (longest first), then recency (most recent first); ``[]``
        when the last tokens never occurred before, or when either limit is 0.
        """
        return [branch for _, branch in self.matches(max_tokens, max_branches)]

    def matches(self, max_tokens: int, max_branches: int) -> list[tuple[int, list[int]]]:
        """:meth:`candidates` with the length of the match each was found by: ``(n, branch)``."""
        if max_tokens < 0 or max_branches < 0:
            raise ConfigError(
                f"lookup candidates: max_tokens={max_tokens}, max_branches={max_branches}; give integers >= 0."
            )
        history = self._tokens
        last = len(history) - 1
        found: list[tuple[int, list[int]]] = []
        if max_tokens == 0 or max_branches == 0:
            return found
        for n in range(min(self.max_ngram, last + 1), self.min_ngram - 1, -1):
            positions = self._ends.get(tuple(history[last - n + 1 :]), ())
            # The newest position is the suffix itself (nothing follows it): skip it.
            for end in positions[-2 : -2 - self.max_scan : -1]:
                _merge(found, n, history[end + 1 : end + 1 + max_tokens])
                if len(found) == max_branches:
                    return found
        return found


def _merge(found: list[tuple[int, list[int]]], n: int, continuation: list[int]) -> None:
    """Add ``continuation`` (matched by ``n`` tokens) unless a branch starts with it; a branch that
    is its prefix grows to it (keeping its own, longer or equal, match length)."""
    for index, (matched, branch) in enumerate(found):
        shorter = min(len(branch), len(continuation))
        if branch[:shorter] == continuation[:shorter]:
            if len(continuation) > len(branch):
                found[index] = (matched, continuation)
            return
    found.append((n, continuation))


def candidates_to_trie(candidates: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Merge token chains that all start after the root into one breadth-first trie.

    Node 0 is the root (the pending token ``x_T``, not listed). ``tokens[i]`` and
    ``parents[i]`` describe node ``i + 1``: its token and its parent's node number (0 for
    a child of the root, otherwise a node listed before it). Chains sharing a prefix
    share its nodes; nodes are ordered by depth, then by the order in which the chains
    first reach them, so parents always come before their children.

    To add the trie to a tree whose node numbers differ: ``nodes = [root]``, then for each
    ``(token, parent)`` append ``tree.add(token, nodes[parent])``.
    """
    children: list[dict[int, int]] = [{}]  # the trie, insertion-ordered: node -> {token: child node}
    for chain in candidates:
        node = 0
        for token in chain:
            token = int(token)
            child = children[node].get(token)
            if child is None:
                child = len(children)
                children[node][token] = child
                children.append({})
            node = child
    tokens: list[int] = []
    parents: list[int] = []
    level = [0]  # breadth-first renumbering: trie node -> output node, level by level
    number = {0: 0}
    while level:
        following = []
        for node in level:
            for token, child in children[node].items():
                tokens.append(token)
                parents.append(number[node])
                number[child] = len(tokens)
                following.append(child)
        level = following
    return tokens, parents
