"""The SpAF drafter as a proposer: serial drafts, then aligned ones (DESIGN §4).

The chain logic lives here once; the graph calls are a backend's :class:`DraftCalls`
(PyTorch tensors in :mod:`spaf_edge.generation.drafting`, host buffers bound to ONNX
Runtime in :mod:`spaf_edge.runtime.drafting`). A call returns opaque *state handles*
(a tensor, or a buffer row): the proposer passes them from one call to the next and never
looks inside. Torch-free.

Draft ``j`` (position ``T+j``) comes from the draft head on ``h̄(T+j-1)`` and the top state
before it, ``f̄(T+j-2)``, which is exact for ``j = 1`` (``f(T-1)``, kept from the last upper
call) and the previous draft's drafted top state after that. ``h̄(T+j-1)`` is exact (the
lower stack, a *serial* draft) for ``j <= s`` and the AlignmentHead's pseudo state after.
With ``s = 0`` every draft is aligned: the chain starts at ``T-1`` from its exact states,
whose drafted top state the first draft reads, as in the training rollout's first step.

An *attending* adapter (the draft head has a KV cache of its own) keeps exact entries for
committed positions. Exact rows wait in the backend's queue (the verify pass's states of
each newly committed position) and are computed by the next first draft, in one call with
the pending token's row; later drafts of a chain append drafted entries, which
:meth:`SpAFProposer.accepted` drops again.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from spaf_edge.core.sampling import choose, draft_distribution, top_probability
from spaf_edge.decoding.loop import DecodeSettings, Proposal
from spaf_edge.decoding.tree import DraftTree

State = Any  # a backend's handle on one position's state: a [1, 1, H] tensor, or a buffer row

CHAIN_START = 0  # head output slot of the drafted top state of T-1 (a chain of aligned drafts only)


class DraftCalls(Protocol):
    """The graph calls and kept states the SpAF proposer needs from a backend."""

    attends: bool  # the draft head has a KV cache (an attending adapter)
    draft_vocab: np.ndarray | None  # int64 [V_d]: the token of each draft logit (None: every token)
    vocab_size: int  # V, the base's vocabulary that q covers

    @property
    def position(self) -> int:
        """T, the pending token's position."""

    @property
    def pending(self) -> int:
        """x_T."""

    # exact states kept from the last upper call
    def exact_hidden(self) -> State:
        """h(T-1)."""

    def exact_top(self) -> State:
        """f(T-1); zeros at T = 0."""

    def exact_top2(self) -> State:
        """f(T-2); zeros for T < 2."""

    def row_states(self, row: int, before: int | None) -> tuple[State, State]:
        """The last upper call's row ``row``: its cutoff state, and the top state of the position
        before it: row ``before``'s, or the exact ``f(T-1)`` when None."""

    # graph calls of a draft step
    def serial(self, token: int, j: int) -> State:
        """The lower stack on ``token`` at position ``T+j-1`` (its cache grows): exact ``h(T+j-1)``."""

    def align(self, token: int, hidden: State, j: int) -> State:
        """The AlignmentHead on ``e(token)`` and ``hidden``: pseudo ``ĥ(T+j-1)``."""

    def head(self, hidden: State, previous: State, slot: int) -> tuple[np.ndarray, State]:
        """The draft head on one row: draft-vocabulary logits [V_d] and the drafted top state (in ``slot``)."""

    # an attending adapter's cache
    @property
    def adapter_length(self) -> int:
        """Entries in the adapter's cache (all exact between steps)."""

    @property
    def queued(self) -> int:
        """Exact rows waiting for the adapter's next call."""

    def rewind_adapter(self, length: int) -> None:
        """Keep the first ``length`` entries of the adapter's cache."""

    def drop_queue(self) -> None:
        """Forget the queued rows."""

    def queue(self, hidden: State, previous: State) -> None:
        """Keep a copy of one exact row (a cutoff state and the top state before it) for the next call."""

    def run_queue(self, slot: int) -> tuple[np.ndarray, State]:
        """The draft head on the queued rows at the cache's next positions; the queue empties.
        Returns the last row's draft-vocabulary logits and drafted top state (in ``slot``)."""


class SpAFProposer:
    """Chains of SpAF drafts through a backend's :class:`DraftCalls`."""

    def __init__(self, calls: DraftCalls) -> None:
        self.calls = calls

    def start(self, shared: int, active: bool) -> int:
        calls = self.calls
        if not calls.attends:
            return shared
        # Entries past the shared positions belong to other tokens; the queued ones are dropped.
        calls.rewind_adapter(min(shared, calls.adapter_length))
        calls.drop_queue()
        # Positions without an entry (plain greedy ran, or they were only queued) are recomputed.
        return calls.adapter_length if active else shared

    def prefilled(self, begin: int, rows: int) -> None:
        """Adapter entries of the call's rows the cache lacks, each reading its previous top state."""
        calls = self.calls
        if not calls.attends:
            return
        for row in range(max(0, calls.adapter_length - begin), rows):
            calls.queue(*calls.row_states(row, row - 1 if row else None))
        if calls.queued:
            calls.run_queue(1)  # its draft is not used: slot 1 is scratch here

    def propose(self, budget: int, settings: DecodeSettings, rng: np.random.Generator) -> Proposal:
        calls, params = self.calls, settings.params
        budget = min(budget, settings.num_draft_tokens)
        token = calls.pending
        tokens, probs, exact = [token], [], 0
        runners: list[list[int]] = []  # per draft: the next most likely tokens of its logits
        transition = settings.serial_parallel_transition
        serial = transition if calls.position > 0 else max(1, transition)  # no h(T-1) at T = 0
        previous = self._start_before() if serial == 0 and budget > 0 else calls.exact_top()
        hidden = calls.exact_hidden()  # read by the first aligned draft of an s = 0 chain
        for j in range(1, budget + 1):
            if j <= serial:
                hidden = calls.serial(token, j)
                exact = j
            else:
                hidden = calls.align(token, hidden, j)
            if calls.attends and j == 1:  # after the exact rows queued at commit
                calls.queue(hidden, previous)
                logits, previous = calls.run_queue(j)
            else:
                logits, previous = calls.head(hidden, previous, j)
            if params.greedy:  # a deterministic candidate: acceptance never reads its q
                q, token = None, greedy_token(logits, calls.draft_vocab)
            else:
                q = draft_distribution(logits, params, calls.draft_vocab, calls.vocab_size)
                if q is None:  # NaN/inf logits (broken drafter weights): nothing to draw a draft from
                    break
                token = choose(q, params, rng)
            threshold = settings.draft_stop_threshold
            doubtful = threshold is not None and (top_probability(logits) if params.greedy else q.max()) < threshold
            if doubtful and j > settings.min_drafts:
                break
            tokens.append(token)
            probs.append(q)
            runners.append(runners_up(logits, calls.draft_vocab, token, settings.tree_width - 1))
            if doubtful and j >= settings.min_drafts:  # kept for a free verify row; the chain ends here
                break
        tree = DraftTree.from_chain(tokens, probs)
        # Runner-up leaves, after the chain (its serial nodes stay first): deterministic candidates,
        # point masses to the acceptance rule; one of them is often the base's token after a rejection.
        for parent, leaves in enumerate(runners):
            for leaf in leaves:
                if len(tree) > settings.max_nodes:
                    break
                tree.add(leaf, parent)
        return Proposal(tree, exact)

    def accepted(self, proposal: Proposal, rows: list[int]) -> None:
        """Drop the chain's drafted adapter entries and queue the exact rows of positions ``.. T+n``.

        Entries past ``T`` are drafted, and so is ``T``'s unless the first draft was serial.
        """
        calls = self.calls
        if not calls.attends:
            return
        start = calls.position
        calls.rewind_adapter(min(calls.adapter_length, start + int(proposal.exact > 0)))
        for position in range(calls.adapter_length + calls.queued, start + len(rows)):
            index = position - start
            calls.queue(*calls.row_states(rows[index], rows[index - 1] if index else None))

    def _start_before(self) -> State:
        """The drafted top state of ``T-1`` from its exact states, ``final_norm(a(h(T-1), f(T-2)))``.

        An attending adapter computes it with its queued rows, which end at ``T-1`` (re-queued
        from the cache when none are queued), so that entry stays exact. Its draft is not used.
        """
        calls = self.calls
        if not calls.attends:
            return calls.head(calls.exact_hidden(), calls.exact_top2(), CHAIN_START)[1]
        if calls.queued == 0:
            calls.rewind_adapter(calls.adapter_length - 1)
            calls.queue(calls.exact_hidden(), calls.exact_top2())
        return calls.run_queue(CHAIN_START)[1]


def greedy_token(logits: np.ndarray, draft_vocab: np.ndarray | None) -> int:
    """The full-vocabulary id of the highest draft logit [V_d] (first on ties, as argmax of ``q`` is)."""
    best = int(np.argmax(logits))
    return best if draft_vocab is None else int(draft_vocab[best])


def runners_up(logits: np.ndarray, draft_vocab: np.ndarray | None, chosen: int, count: int) -> list[int]:
    """The ``count`` tokens with the highest draft logits [V_d] besides ``chosen`` (highest first).

    Read from the logits: greedy drafting keeps no ``q``.
    """
    if count <= 0:
        return []
    top = np.argpartition(logits, -(count + 1))[-(count + 1):]
    top = top[np.argsort(-logits[top], kind="stable")]
    tokens = top if draft_vocab is None else draft_vocab[top]
    return [int(token) for token in tokens if token != chosen][:count]
