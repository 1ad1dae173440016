"""Draft trees and their exact acceptance (DESIGN §4b), in numpy.

A tree generalises the draft chain: node 0 is the pending token ``x_T``, every other node
a candidate whose parent is the token before it. ``accept_tree`` walks it from the root,
one verified target distribution per node visited, and returns the accepted path and the
bonus token. On a chain it makes exactly the choices and random draws of
``spaf_edge.core.sampling.accept``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import DTypeLike

from spaf_edge.core.sampling import SamplingParams, is_distribution, sample

Proposal = tuple[int, np.ndarray | None]  # (child node, the q its candidate was drawn from; None: deterministic)


class DraftTree:
    """Candidate tokens in a tree; node 0 is the root ``x_T``, parents come before children.

    Each node has a token, a parent (-1 for the root), a depth (root 0) and the draft
    distribution ``q`` (float64 over the full vocabulary) its token was drawn from, or None
    for a deterministic candidate (a top-k child, a lookup token: a point mass).

    A token proposed twice under one parent gets one node, but every proposal is kept in
    order (``proposals``): ``accept_tree`` replays them all, which keeps it exact when i.i.d.
    draws from one ``q`` coincide (see ``accept_tree``). The ``q`` arrays are stored, not
    copied: do not modify them afterwards.
    """

    def __init__(self, root: int) -> None:
        self._tokens: list[int] = [int(root)]
        self._parents: list[int] = [-1]
        self._depths: list[int] = [0]
        self._qs: list[np.ndarray | None] = [None]
        self._children: list[list[int]] = [[]]
        self._proposals: list[list[Proposal]] = [[]]
        self._index: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    @classmethod
    def from_chain(cls, tokens: Sequence[int], probs: Sequence[np.ndarray | None] | None = None) -> DraftTree:
        """The chain ``tokens = [x_T, d_1, .., d_D]``; ``probs[j]`` is the ``q`` of ``d_{j+1}``
        (D entries; None, or probs None: deterministic drafts)."""
        if probs is not None and len(probs) != len(tokens) - 1:
            raise ValueError(f"{len(tokens) - 1} drafts need as many draft distributions, got {len(probs)}")
        tree = cls(tokens[0])
        for j, token in enumerate(tokens[1:]):
            tree.add(token, j, None if probs is None else probs[j])
        return tree

    def add(self, token: int, parent: int, q: np.ndarray | None = None) -> int:
        """Propose ``token`` as a child of node ``parent``; returns its node index.

        ``q``: the distribution [V] the token was drawn from, None when it was chosen
        deterministically. A token already under ``parent`` returns that node (which keeps
        its first ``q``); the proposal itself is still recorded.
        """
        token, parent = int(token), int(parent)
        if not 0 <= parent < len(self._tokens):
            raise IndexError(f"parent {parent} is not a node of this {len(self._tokens)}-node tree")
        node = self._index.get((parent, token))
        if node is None:
            node = len(self._tokens)
            self._index[(parent, token)] = node
            self._tokens.append(token)
            self._parents.append(parent)
            self._depths.append(self._depths[parent] + 1)
            self._qs.append(q)
            self._children.append([])
            self._proposals.append([])
            self._children[parent].append(node)
        self._proposals[parent].append((node, q))
        return node

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> np.ndarray:
        """int64 [N], the root's token first."""
        return np.array(self._tokens, dtype=np.int64)

    @property
    def parents(self) -> np.ndarray:
        """int64 [N]; the root's parent is -1."""
        return np.array(self._parents, dtype=np.int64)

    @property
    def depths(self) -> np.ndarray:
        """int64 [N]; the root is at depth 0."""
        return np.array(self._depths, dtype=np.int64)

    def token(self, node: int) -> int:
        return self._tokens[node]

    def q(self, node: int) -> np.ndarray | None:
        """The draft distribution node ``node`` was first proposed with (None: deterministic or the root)."""
        return self._qs[node]

    def children(self, node: int) -> list[int]:
        """Distinct child nodes in insertion order."""
        return list(self._children[node])

    def child(self, node: int, token: int) -> int | None:
        """The child of ``node`` holding ``token``, if any."""
        return self._index.get((node, int(token)))

    def proposals(self, node: int) -> list[Proposal]:
        """Every proposal made under ``node`` in insertion order, duplicates included: (child, q)."""
        return list(self._proposals[node])

    def path_to(self, node: int) -> list[int]:
        """The nodes from depth 1 down to ``node`` (the root excluded; empty for the root)."""
        path = []
        while node > 0:
            path.append(node)
            node = self._parents[node]
        return path[::-1]

    @property
    def is_chain(self) -> bool:
        """Every node but the last has exactly one child, proposed once (a lone root counts).

        Such a tree is accepted exactly like the plain chain by ``sampling.accept``.
        """
        return all(parent == node - 1 for node, parent in enumerate(self._parents[1:], start=1)) and all(
            len(proposals) <= 1 for proposals in self._proposals
        )

    def ancestor_mask(self) -> np.ndarray:
        """bool [N, N]: ``mask[i, j]`` is True where node j is node i or one of its ancestors."""
        n = len(self._tokens)
        mask = np.zeros((n, n), dtype=bool)
        for node in range(n):
            if node:
                mask[node] = mask[self._parents[node]]  # parents come first: their row is complete
            mask[node, node] = True
        return mask

    def ancestor_bias(self, dtype: DTypeLike = np.float32) -> np.ndarray:
        """Additive attention bias [N, N] (rows: queries, columns: keys) among the tree's nodes.

        0 where the key is the query's ancestor-or-self, ``masked_value(dtype)`` elsewhere.
        Columns for the committed cache (all 0) are the caller's to prepend.
        """
        return np.where(self.ancestor_mask(), 0, masked_value(dtype)).astype(dtype)

    def positions(self, start: int) -> np.ndarray:
        """Rotary positions int64 [N]: ``start + depth``; ``start`` is the root's position T."""
        return start + self.depths


def masked_value(dtype: DTypeLike = np.float32) -> float:
    """The bias of a masked attention entry: half the most negative finite value of ``dtype``.

    Finite, because some kernels compute ``-inf - -inf`` (NaN); halved, so adding any score
    of magnitude below half the dtype's range stays finite; softmax still gives it exactly 0.
    Build the bias in the dtype the kernel adds it in: cast to a narrower float it overflows.
    """
    return float(np.finfo(dtype).min) / 2


class TargetProbs(Protocol):
    """Processed target distributions, one per node, read on demand: ``probs[node] -> [V]``."""

    def __getitem__(self, node: int) -> np.ndarray: ...


def accept_tree(
    tree: DraftTree, target_probs: TargetProbs, params: SamplingParams, rng: np.random.Generator
) -> tuple[list[int], int]:
    """Exact tree acceptance. Returns ``(path, bonus_token)``: ``path`` the accepted nodes
    (root excluded, root-first), ``bonus_token`` the target's token after them.

    target_probs: ``target_probs[i]`` is the processed target distribution [V] at node i
    (given the root's context and the path to i). It is indexed only at the nodes visited,
    once each, root first, in visiting order.

    Greedy: follow the child equal to the argmax of the node's ``p``; the bonus is the argmax
    at the first node without such a child. No random draws.

    Sampling: at each node, replay its proposals in insertion order against a residual ``r``
    (first the node's ``p``). A candidate ``c`` drawn from ``q`` (``q = δ_c`` if deterministic)
    is accepted with probability ``min(1, r(c) / q(c))``; on rejection
    ``r <- norm(max(0, r - q))``, which for ``δ_c`` is ``r`` with ``c`` zeroed. An accepted
    candidate becomes the next node; when every proposal is rejected (or there are none)
    the bonus is drawn from ``r``.

    Why the emitted token has the law ``p``: let candidate k, given everything before it
    (the earlier candidates and their rejections), have law ``q_k``, and suppose the steps
    after a rejection emit ``r_{k+1} = max(0, r_k - q_k) / β``. Step k emits ``x`` with
    probability ``q_k(x) min(1, r_k(x) / q_k(x)) = min(q_k, r_k)(x)`` and rejects with
    probability ``β = Σ (q_k - min(q_k, r_k)) = Σ max(0, r_k - q_k)`` (both sum to 1), so it
    emits ``min(q_k, r_k) + max(0, r_k - q_k) = r_k``. Induction from the bonus (drawn from
    the last residual) gives ``r_1 = p``; after an accepted candidate the same holds at the
    child, whose ``p`` is conditioned on the path, so every emitted sequence has the
    target's law. The hypothesis holds for deterministic candidates (any rule of the past),
    and for i.i.d. draws from one ``q``: a draw is independent of its siblings' fates, so the
    same ``q`` serves every sibling drawn from it; draws WITHOUT replacement do not qualify
    unless each carries its own renormalised ``q``. A duplicate proposal cannot be dropped:
    after its twin's rejection it is rejected for sure (``r(c)`` is 0 then) but still moves
    ``r`` to ``norm(max(0, r - q))``; so the tree keeps and replays it.

    As in ``sampling.accept``, a ``q`` that is no distribution or gives its candidate
    probability 0 says nothing about how the candidate was drawn: the proposal is skipped
    untested, ``r`` unchanged. A residual of total 0 (only by rounding) leaves ``r`` as it was.

    Random draws (fixed order): nodes root-first; at a node, its proposals in order, one
    uniform for each tested one with ``q(c) > r(c)`` (``q(c) = 1`` for a deterministic one;
    ``q(c) <= r(c)`` accepts with no draw; skipped proposals draw none); then one ``sample``
    from the final node's residual for the bonus. On a chain this is exactly
    ``sampling.accept``'s order, so the same generator gives the same result.
    """
    path: list[int] = []
    node = 0
    while True:
        p = target_probs[node]
        if params.greedy:
            best = int(np.argmax(p))
            child = tree.child(node, best)
            if child is None:
                return path, best
            path.append(child)
            node = child
            continue
        residual, accepted = p, None
        for child, q in tree.proposals(node):
            token = tree.token(child)
            if q is not None and not (q[token] > 0 and is_distribution(q)):
                continue
            chance = 1.0 if q is None else float(q[token])  # q(c) of the candidate's own draw
            # q(c) <= r(c): always accept; else accept with probability r(c) / q(c).
            if chance <= residual[token] or rng.random() * chance < residual[token]:
                accepted = child
                break
            residual = _reject(residual, token, q)
        if accepted is None:
            return path, sample(residual, rng)
        path.append(accepted)
        node = accepted


def _reject(residual: np.ndarray, token: int, q: np.ndarray | None) -> np.ndarray:
    """The residual after rejecting ``token`` drawn from ``q`` (None: a point mass on it).

    ``norm(max(0, r - q))``; for a point mass that is ``r`` with ``token`` zeroed. A new array.
    """
    if q is None:
        left = residual.copy()
        left[token] = 0.0
    else:
        left = np.maximum(residual - q, 0.0)
    total = left.sum()
    if not total > 0:
        return residual
    left /= total
    return left
