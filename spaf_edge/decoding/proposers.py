"""The proposers a generation combines into one draft tree (DESIGN §4b).

``spaf``: the SpAF drafter's chain (:class:`spaf_edge.decoding.spaf.SpAFProposer`), with
its runner-up tokens as extra leaves when ``tree_width > 1``; ``lookup``: branches copied
from the prompt and the generated text (:class:`LookupProposer`, no model call). Their
proposals are merged into one tree: a token already under the same parent becomes a second
proposal of the same node (:class:`spaf_edge.decoding.tree.DraftTree`), at most
``max_nodes`` candidates in all.

Where trees are not verified exactly (ONNX Runtime's CPU attention rounds a node off the
tree's first path differently from the same node in a chain: benchmarks/results/cpu-tree-verify),
the proposals are chains: with both proposers, a lookup branch found by a match of at least
``lookup_min_match`` tokens is the chain, else SpAF drafts it. How far a lookup branch copies
grows while its copies are accepted (:class:`LookupProposer`). Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from spaf_edge.decoding.lookup import NgramIndex
from spaf_edge.decoding.loop import DecodeSettings, Proposal
from spaf_edge.decoding.spaf import SpAFProposer
from spaf_edge.decoding.tree import DraftTree


class LookupProposer:
    """Branches copied from the history after the longest earlier match of its last tokens.

    How far a branch may copy grows while copies keep being accepted: ``lookup_start`` tokens,
    doubled after each step that accepted its whole lookup chain, at most ``lookup_depth``, and
    back to ``lookup_start`` after any other step. A long quoted passage is then verified in long
    chains, while a chance match costs few verify rows (benchmarks/results/cpu-drafting-policy-v12).
    The limit depends only on earlier steps' acceptance, so sampling stays exact.
    """

    def __init__(self, history: Callable[[], list[int]], index: NgramIndex | None = None) -> None:
        self.history = history  # the backend's committed tokens x_0 .. x_T
        self.index = index or NgramIndex()
        self.streak = 0  # steps in a row that accepted their whole lookup chain
        self.proposed = 0  # tokens of this step's (first) lookup branch; 0: none proposed

    def start(self) -> None:
        """A new generation: the index re-reads the history when next asked; copies start short."""
        self.index.reset()
        self.streak = self.proposed = 0

    def limit(self, settings: DecodeSettings) -> int:
        """Tokens a branch may copy this step."""
        return min(settings.lookup_depth, settings.lookup_start << min(self.streak, settings.lookup_depth))

    def proposing(self, tokens: int) -> None:
        """This step proposes a lookup branch of ``tokens`` (0: none)."""
        self.proposed = tokens

    def accepted(self, drafts: int) -> None:
        """After verify: the step accepted ``drafts`` drafts."""
        self.streak = self.streak + 1 if self.proposed and drafts >= self.proposed else 0

    def matches(self, budget: int, branches: int) -> list[tuple[int, list[int]]]:
        """Up to ``branches`` continuations of at most ``budget`` tokens after the pending one, each
        with the length of its match (longest first)."""
        tokens = self.history()
        if len(self.index) > len(tokens):  # a new generation the index did not see start
            self.index.reset()
        self.index.extend(tokens[len(self.index):])
        return self.index.matches(budget, branches)


class Proposers:
    """The proposers of ``settings.proposers`` as one: their proposals merged into one tree."""

    def __init__(self, spaf: SpAFProposer, lookup: LookupProposer, trees: bool) -> None:
        self.spaf = spaf
        self.lookup = lookup
        self.trees = trees  # the backend verifies trees (else chains only)

    def start(self, shared: int, active: bool) -> int:
        self.lookup.start()
        return self.spaf.start(shared, active)

    def prefilled(self, begin: int, rows: int) -> None:
        self.spaf.prefilled(begin, rows)

    def propose(self, budget: int, settings: DecodeSettings, rng: np.random.Generator) -> Proposal:
        use_spaf = "spaf" in settings.proposers
        use_lookup = "lookup" in settings.proposers
        if not self.trees or len(self.lookup.history()) < 2:  # a tree needs a committed position
            return self._chain(budget, settings, rng, use_spaf, use_lookup)
        proposal = self.spaf.propose(budget, settings, rng) if use_spaf else Proposal(DraftTree(self.pending))
        branches = self.lookup.matches(min(budget, self.lookup.limit(settings)), settings.lookup_branches) \
            if use_lookup else []
        self.lookup.proposing(len(branches[0][1]) if branches else 0)
        add_branches(proposal.tree, [branch for _, branch in branches], settings.max_nodes)
        return proposal

    def _chain(self, budget: int, settings: DecodeSettings, rng: np.random.Generator, use_spaf: bool,
               use_lookup: bool) -> Proposal:
        """One chain: the best lookup branch when its match is long enough (or SpAF is not used), else SpAF's."""
        found = self.lookup.matches(min(budget, self.lookup.limit(settings)), 1) if use_lookup else []
        chosen = bool(found) and (not use_spaf or found[0][0] >= settings.lookup_min_match)
        self.lookup.proposing(len(found[0][1]) if chosen else 0)
        if chosen:
            return Proposal(DraftTree.from_chain([self.pending, *found[0][1]]))
        if use_spaf:  # no runner-up leaves: a chain
            return self.spaf.propose(budget, replace(settings, tree_width=1), rng)
        return Proposal(DraftTree(self.pending))

    @property
    def pending(self) -> int:
        return self.lookup.history()[-1]

    def accepted(self, proposal: Proposal, rows: list[int]) -> None:
        self.lookup.accepted(len(rows) - 1)
        self.spaf.accepted(proposal, rows)  # its adapter queue follows every commit, drafted or not


def add_branches(tree: DraftTree, branches: list[list[int]], max_nodes: int) -> None:
    """Merge token chains that start after the root into ``tree`` as deterministic candidates,
    while it has fewer than ``max_nodes`` candidates (the root not counted)."""
    for branch in branches:
        node = 0
        for token in branch:
            if tree.child(node, token) is None and len(tree) > max_nodes:
                break
            node = tree.add(token, node)
