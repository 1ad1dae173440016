"""The ONNX Runtime backend of the decoding loop (:mod:`spaf_edge.decoding.loop`, DESIGN §4, §6).

Prefill, verify and commit on the two bound stack graphs; the drafts come from the SpAF
proposer (:class:`spaf_edge.decoding.spaf.SpAFProposer`) over this engine's draft calls
(:mod:`spaf_edge.runtime.drafting`). Greedy output equals the PyTorch reference's and the
base model's; a seeded sample equals the reference's, draw for draw. State between steps:
committed tokens ``x_0 .. x_T``; both KV caches hold positions ``0 .. T-1``; ``x_T`` is pending.

Cutoff states never leave host buffers that ONNX Runtime reads and writes in place:
serial draft steps write ``h(T+j-1)`` into hidden row ``j-1``, the verify pass's lower
stack writes the remaining rows, and the upper stack reads rows ``0 .. D``. The lower
stack reads token embedding rows that the decoder copies out of ``embeddings.bin``
(:class:`spaf_edge.runtime.embeddings.EmbeddingTable`).

The exact states of ``T-1`` that drafting starts from are kept at the end of every upper
call (:meth:`Decoder.keep_exact`): ``prev_tops`` row 0 holds ``f(T-1)`` (zeros for a
one-token prompt), ``prev_hidden`` ``h(T-1)`` and ``prev_top2`` ``f(T-2)``. Batch 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from spaf_edge.decoding.loop import (
    DecodeResult,
    DecodeSettings,
    Proposal,
    Proposer,
    common_prefix,
    decode,
)
from spaf_edge.runtime.buffers import HostBuffers
from spaf_edge.runtime.embeddings import EmbeddingTable
from spaf_edge.runtime.graphs import LowerGraph, TreeInputs, UpperGraph

# The stacks' GroupQueryAttention runs one query row more than each call, whose KV entry lands
# past the call's rows (spaf_edge.exporters.layers.make_group_query_attention).
ATTENTION_PAD_ROWS = 1
class Decoder:
    """The engine's backend: both stacks, their caches and the host buffers they run on."""

    def __init__(
        self,
        lower: LowerGraph,
        upper: UpperGraph,
        embeddings: EmbeddingTable,
        buffers: HostBuffers,
        vocab_size: int,
        eos: frozenset[int],
        prefill_chunk: int,
    ) -> None:
        self.lower, self.upper = lower, upper
        self.embeddings = embeddings  # token rows for the lower stack and the drafter
        self.buffers = buffers
        self.vocab_size = vocab_size
        self.eos = eos
        self.prefill_chunk = prefill_chunk
        self.tokens: list[int] = []  # committed x_0 .. x_T of the current generation
        self.proposer: Proposer | None = None  # set by the engine: the SpAF drafter over this decoder
        # Run one-row stack calls as two rows (the second is padding), so that decode steps and
        # verify passes share one kernel path where the device rounds one row differently
        # (spaf_edge.runtime.rows.check_rows sets it).
        self.pad = False
        self.tree_inputs = TreeInputs(buffers.rows, buffers.hidden.array.dtype)  # a tree verify's, both stacks
        self.drafting = False  # this generation drafts: keep the exact states drafting starts from

    @property
    def verifies_trees(self) -> bool:
        """The stacks take a draft tree in one call (export format 6); older exports verify chains."""
        return self.lower.accepts_trees and self.upper.accepts_trees

    @property
    def max_length(self) -> int:
        """Positions a generation may use: the stacks' attention writes a row past each call (export
        format 5), and a padded call has one row more."""
        return self.lower.kv.max_length - ATTENTION_PAD_ROWS - int(self.pad)

    def reset(self) -> None:
        """Forget the current generation: empty caches, no tokens."""
        self.tokens = []
        for kv in (self.lower.kv, self.upper.kv):
            kv.reset()
        if self.proposer is not None:
            self.proposer.start(0, active=False)

    @property
    def position(self) -> int:
        """T: position of the pending token (= valid length of both caches)."""
        return len(self.tokens) - 1

    @property
    def exact_top(self) -> np.ndarray:
        """The exact top state of position ``T-1`` the next draft starts from: [1, 1, H] (a view)."""
        return self.buffers.prev_tops.array[:, :1]

    def steps(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        settings: DecodeSettings,
        rng: np.random.Generator,
        result: DecodeResult,
        reuse_cache: bool = False,
    ) -> Iterator[list[int]]:
        """Generate into ``result``, yielding the tokens each verify step commits."""
        depth, nodes = self.call_rows(settings)
        # D + 3 rows: an attending adapter may queue positions T .. T+D and one more after a final
        # draft-less step, plus the pending token's row
        self.buffers.ensure_rows(max(depth + 3, nodes), logit_rows=nodes)
        self.tree_inputs.ensure_rows(nodes)
        return decode(self, prompt_ids, max_new_tokens, settings, rng, result, reuse_cache)

    def call_rows(self, settings: DecodeSettings) -> tuple[int, int]:
        """(longest chain of candidates, rows of the widest verify call) that ``settings`` make."""
        drafts = settings.num_draft_tokens if settings.mode == "spaf" else 0
        trees = drafts and self.proposer is not None and self.proposer.trees
        depth = max(drafts, settings.lookup_depth if drafts and "lookup" in settings.proposers else 0)
        return depth, max(depth, settings.max_nodes if trees else 0) + 1

    # ---- phases ---------------------------------------------------------
    def prefill(self, prompt_ids: Sequence[int], reuse_cache: bool = False, active: bool = False) -> None:
        """Run both stacks on ``prompt[:-1]`` in chunks; the last prompt token becomes pending.

        With ``reuse_cache``, the cached rows of the positions the prompt shares with the
        previous tokens are kept, except the last two body rows at most: the top states of
        ``T-1`` and ``T-2`` that drafting reads are not kept, so they are recomputed. The
        proposer may ask for more to be recomputed (:meth:`Proposer.start`) and, when
        ``active`` (this generation drafts), is told about every chunk. When ``active``, the exact
        top state of ``T-1`` ends in ``prev_tops`` row 0 (zeros when the prompt has one token);
        plain decoding keeps no states for drafting (a later generation that reuses the cache
        recomputes the ones it reads).
        """
        body = prompt_ids[:-1]
        shared = min(common_prefix(self.tokens[: self.position], body), len(body) - 1) if reuse_cache else 0
        shared = max(0, shared)
        proposer = self.proposer
        if proposer is not None:
            shared = proposer.start(shared, active)
        start = max(0, shared - 1)
        self.lower.kv.rewind_to(min(start, self.lower.kv.length))
        self.upper.kv.rewind_to(min(start, self.upper.kv.length))
        self.tokens = list(prompt_ids)
        self.drafting = active
        self.buffers.ensure_rows(max(2, min(len(body), self.prefill_chunk)))  # 2: a padded one-row call
        self.buffers.prev_tops.array[:, 0] = 0  # no position before x_0: the reference's zeros
        for begin in range(self.lower.kv.length, len(body), self.prefill_chunk):
            chunk = body[begin:begin + self.prefill_chunk]
            self.run_lower(chunk, row=0)
            self.run_upper(len(chunk), num_logits=0)  # prefill needs top states only: no LM head
            if proposer is not None and active:
                proposer.prefilled(begin, len(chunk))
            if active:
                last = len(chunk) - 1
                self.keep_exact(last, last - 1 if last else None)

    def verify(self, proposal: Proposal) -> np.ndarray:
        """One batched target pass over the tree's nodes (a chain: positions ``T .. T+D``), each
        attending to the committed positions and its ancestors. Returns logits [N, V] (a view)."""
        tree, exact = proposal.tree, proposal.exact
        if tree.is_chain:
            if exact < len(tree):
                self.run_lower(tree.tokens[exact:], row=exact)
            return self.run_upper(len(tree), num_logits=len(tree))
        parents = tree.parents
        if exact and (parents[exact:] < exact - 1).any():  # a node that must not see the serial drafts' rows
            self.lower.kv.rewind_to(self.position)
            exact = 0
        inputs = self.tree_inputs
        inputs.tree(np.where(parents[exact:] < exact, -1, parents[exact:] - exact))
        self.run_lower(tree.tokens[exact:], row=exact, tree=inputs)
        inputs.tree(parents)
        return self.run_upper(len(tree), num_logits=len(tree), tree=inputs)

    def commit(self, proposal: Proposal, rows: list[int], bonus: int) -> None:
        """Append the accepted drafts and the bonus; cut both caches back to the valid length.

        The verify pass's states of ``T+n`` become the exact ones the next draft starts from.
        """
        start, valid = self.position, self.position + len(rows)  # positions T .. T+n now hold accepted tokens
        self.tokens.extend([*(proposal.tree.token(row) for row in rows[1:]), bonus])
        if self.drafting:
            self.keep_exact(rows[-1], rows[-2] if len(rows) > 1 else None)
        for kv in (self.lower.kv, self.upper.kv):
            if not proposal.tree.is_chain:  # the accepted path's rows move to T .. T+n
                kv.rewind_to(start)
                kv.compact(rows)
            kv.rewind_to(valid)

    # ---- graph calls ----------------------------------------------------
    def run_lower(self, tokens: Sequence[int], row: int, tree: TreeInputs | None = None) -> None:
        """Lower stack on ``tokens`` at the next positions (or as ``tree`` describes them); cutoff states
        into hidden rows ``row ..``."""
        new, buffers = len(tokens), self.buffers
        rows = self._call_rows(new)
        self.embeddings.lookup(tokens, buffers.embeds.array[0, :new])
        if rows > new:  # the padding row repeats the token; its output row (row + 1) is scratch
            buffers.embeds.array[0, new] = buffers.embeds.array[0, 0]
        self.lower.run(buffers.embeds.view(0, rows), rows, buffers.hidden.view(row, row + rows), tree)
        self.lower.kv.rewind_to(self.lower.kv.length - (rows - new))

    def run_upper(self, new: int, num_logits: int, tree: TreeInputs | None = None) -> np.ndarray:
        """Upper stack on hidden rows ``0 .. new-1`` (a chain, or as ``tree`` describes them): top states
        of all, logits of the last ``num_logits``.

        Returns logits [num_logits, V] (a view of the buffer).
        """
        buffers = self.buffers
        rows = self._call_rows(new)
        # A padding row (hidden row 1, the padded lower call's scratch) comes last: asking for one
        # more logit row keeps the real row's logits in row 0.
        logit_rows = num_logits + (rows - new) if num_logits else 0
        self.upper.run(buffers.hidden.view(0, rows), rows, buffers.logits.view(0, logit_rows),
                       buffers.top_hidden.view(0, rows), logit_rows, tree)
        self.upper.kv.rewind_to(self.upper.kv.length - (rows - new))
        return buffers.logits.array[0, :num_logits]

    def _call_rows(self, new: int) -> int:
        """Rows a stack call of ``new`` positions runs: two for one when padding (the cache keeps ``new``)."""
        return 2 if self.pad and new == 1 else new

    def keep_exact(self, row: int, before: int | None) -> None:
        """At the end of an upper call: the states of its row ``row`` become those of ``T-1``.

        ``prev_tops`` row 0 gets ``f(T-1)``, ``prev_hidden`` ``h(T-1)``, and ``prev_top2`` ``f(T-2)``
        (row ``before``'s top state, or the previous ``f(T-1)`` when None).
        """
        buffers = self.buffers
        previous = buffers.prev_tops.array[:, 0] if before is None else buffers.top_hidden.array[:, before]
        buffers.prev_top2.array[:, 0] = previous
        buffers.prev_tops.array[:, 0] = buffers.top_hidden.array[:, row]
        buffers.prev_hidden.array[:, 0] = buffers.hidden.array[:, row]


