"""SpAF decoding on the four bound graphs: prefill, draft, verify, accept, commit (DESIGN §4).

Phase for phase the PyTorch reference (:mod:`spaf_edge.generation.reference`), with the
same acceptance code (:func:`spaf_edge.sampling.accept`) and the same random draws in the
same order, so greedy output equals the reference's and the base model's and a seeded
sample equals the reference's sample. State between steps: committed tokens
``x_0 .. x_T``; both KV caches hold positions ``0 .. T-1``; ``x_T`` is pending.

Cutoff states never leave host buffers that ONNX Runtime reads and writes in place:
serial draft steps write ``h(T+j-1)`` into hidden row ``j-1``, the verify pass's lower
stack writes the remaining rows, and the upper stack reads rows ``0 .. D``. The lower
stack and the drafter read token embedding rows that the decoder copies out of
``embeddings.bin`` (:class:`spaf_edge.runtime.embeddings.EmbeddingTable`).

Top states (post-final-norm, what the LM head reads) chain through ``prev_tops``: row 0
holds the exact top state of position ``T-1`` (kept from the last upper call: the last
prefill row, or verify row ``n`` at commit; zeros for a one-token prompt), and draft step
``j`` reads row ``j-1`` and writes its drafted top state into row ``j``, as the reference
chains ``prev_top``. Batch 1.

An attending adapter (the draft head has a KV cache) keeps exact entries for committed
positions, as the reference does: ``commit`` copies the cutoff state and previous top
state of every newly exact position into the ``adapter_hidden``/``adapter_prev`` rows,
and the first draft of the next step runs the draft head on those rows plus the pending
token's, in one call. Prefill fills the cache chunk by chunk; plain greedy mode skips it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from spaf_edge.runtime.embeddings import EmbeddingTable
from spaf_edge.runtime.graphs import DraftHeadGraph, DrafterGraph, HostBuffer, LowerGraph, UpperGraph
from spaf_edge.sampling import SamplingParams, accept, choose, draft_distribution, logits_to_probs, softmax
from spaf_edge.stats import GenerationStats

# The stacks' GroupQueryAttention runs one query row more than each call, whose KV entry lands
# past the call's rows (spaf_edge.exporters.layers.make_group_query_attention).
ATTENTION_PAD_ROWS = 1
MODES = ("spaf", "greedy")  # greedy: plain decoding, one token per full pass (the same-engine baseline)


@dataclass(frozen=True)
class DecodeSettings:
    params: SamplingParams
    num_draft_tokens: int
    serial_parallel_transition: int
    draft_stop_threshold: float | None
    mode: str  # one of MODES


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)  # d_1 .. d_D
    probs: list[np.ndarray] = field(default_factory=list)  # q_j over the full vocabulary
    exact: int = 0  # positions T .. T+exact-1 whose cutoff states the lower stack already computed


@dataclass
class EngineResult:
    tokens: list[int]  # new tokens only
    stats: GenerationStats
    text: str | None = None  # None when the export has no tokenizer
    stop_reason: str = ""  # "eos" | "max_new_tokens" | "context"
    prompt_ids: list[int] = field(default_factory=list)


class TargetProbs:
    """Processed target distributions ``p_T .. p_{T+D}``, each computed when first read.

    :func:`spaf_edge.sampling.accept` reads rows in order and stops at the first
    rejection, so rows after it are never computed (each costs a float64 pass over the
    vocabulary, plus a partial sort with top-p). Row ``j`` equals ``logits_to_probs(logits, params)[j]``.
    """

    def __init__(self, logits: np.ndarray, params: SamplingParams) -> None:
        self.logits = logits  # [D+1, V], a view of the logits buffer: read before the next graph call
        self.params = params
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, j: int) -> np.ndarray:
        row = self._rows.get(j)
        if row is None:
            row = self._rows[j] = logits_to_probs(self.logits[j], self.params)
        return row


class HostBuffers:
    """Host arrays the graphs read and write in place (shared with ORT on CPU, no copies).

    Row buffers have ``rows`` rows (a prefill chunk or a verify pass); the logits buffer has
    ``logit_rows`` (a verify pass's ``D+1``: prefill asks the upper graph for no logits).
    """

    def __init__(
        self, rows: int, logit_rows: int, hidden_size: int, vocab_size: int, draft_vocab_size: int, dtype: type
    ) -> None:
        self.embeds = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: embedding rows of the lower call's tokens
        self.hidden = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: exact cutoff states of T ..
        self.pseudo = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: AlignmentHead states
        self.logits = HostBuffer((1, logit_rows, vocab_size), np.float32)  # [1, R_l, V]
        self.top_hidden = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: the upper call's top states
        self.prev_tops = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: f(T-1), then drafted tops
        # Where a chain of aligned drafts only (s = 0) starts: h(T-1), f(T-2) and the drafted top of T-1
        self.prev_hidden = HostBuffer((1, 1, hidden_size), dtype)  # [1, 1, H]
        self.prev_top2 = HostBuffer((1, 1, hidden_size), dtype)  # [1, 1, H]
        self.chain_top = HostBuffer((1, 1, hidden_size), dtype)  # [1, 1, H]
        self.adapter_hidden = HostBuffer((1, rows, hidden_size), dtype)  # [1, R, H]: h of positions an attending
        self.adapter_prev = HostBuffer((1, rows, hidden_size), dtype)  # adapter has to (re)compute, and their f(t-1)
        self.draft_logits = np.zeros((1, 1, draft_vocab_size), dtype=np.float32)  # [1, 1, V_d]
        self.draft_logits_value = ort.OrtValue.ortvalue_from_numpy(self.draft_logits)  # bound once
        self.token_embeds = np.zeros((1, 1, hidden_size), dtype=dtype)  # [1, 1, H]: the drafter's e(d_{j-1})

    @property
    def rows(self) -> int:
        return self.hidden.rows

    def ensure_rows(self, rows: int, logit_rows: int = 0) -> None:
        """Grow the row buffers to ``rows``, the logits to ``logit_rows`` (between generations: contents dropped)."""
        names = ("embeds", "hidden", "pseudo", "top_hidden", "prev_tops", "adapter_hidden", "adapter_prev")
        names = names if rows > self.rows else ()
        names += ("logits",) if logit_rows > self.logits.rows else ()
        for name in names:
            old: HostBuffer = getattr(self, name)
            size = logit_rows if name == "logits" else rows
            setattr(self, name, HostBuffer((1, size, *old.array.shape[2:]), old.array.dtype))


class Decoder:
    def __init__(
        self,
        lower: LowerGraph,
        upper: UpperGraph,
        drafter: DrafterGraph,
        draft_head: DraftHeadGraph,
        embeddings: EmbeddingTable,
        buffers: HostBuffers,
        vocab_size: int,
        draft_vocab: np.ndarray | None,
        eos: frozenset[int],
        prefill_chunk: int,
    ) -> None:
        self.lower, self.upper, self.drafter, self.draft_head = lower, upper, drafter, draft_head
        self.embeddings = embeddings  # token rows for the lower stack and the drafter
        self.buffers = buffers
        self.vocab_size = vocab_size
        self.draft_vocab = draft_vocab  # int64 [V_d] token ids, None = every token
        self.eos = eos
        self.prefill_chunk = prefill_chunk
        self.tokens: list[int] = []  # committed x_0 .. x_T of the current generation
        self.attends = draft_head.kv is not None  # the adapter keeps a KV cache of its own
        self.adapter_rows = 0  # rows of adapter_hidden/adapter_prev waiting for the next first draft
        self.drafting = True  # False in plain greedy mode: the adapter's cache is not kept
        # Run one-row stack calls as two rows (the second is padding), so that decode steps and
        # verify passes share one kernel path where the device rounds one row differently
        # (spaf_edge.runtime.rows.check_rows sets it).
        self.pad = False

    @property
    def max_length(self) -> int:
        """Positions a generation may use: the stacks' attention writes a row past each call (export
        format 5), and a padded call has one row more."""
        return self.lower.kv.max_length - ATTENTION_PAD_ROWS - int(self.pad)

    def reset(self) -> None:
        """Forget the current generation: empty caches, no tokens."""
        self.tokens = []
        self.adapter_rows = 0
        for kv in (self.lower.kv, self.upper.kv, self.draft_head.kv):
            if kv is not None:
                kv.reset()

    @property
    def position(self) -> int:
        """T: position of the pending token (= valid length of both caches)."""
        return len(self.tokens) - 1

    @property
    def exact_top(self) -> np.ndarray:
        """The exact top state of position ``T-1`` the next draft starts from: [1, 1, H] (a view)."""
        return self.buffers.prev_tops.array[:, :1]

    # ---- the loop -------------------------------------------------------
    def steps(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        settings: DecodeSettings,
        rng: np.random.Generator,
        result: EngineResult,
        reuse_cache: bool = False,
    ) -> Iterator[list[int]]:
        """Generate into ``result``, yielding the tokens each verify step commits."""
        stats, params = result.stats, settings.params
        drafts = settings.num_draft_tokens if settings.mode == "spaf" else 0
        self.drafting = settings.mode == "spaf"
        # D + 3 rows: an attending adapter may queue positions T .. T+D and one more after a final
        # draft-less step, plus the pending token's row
        self.buffers.ensure_rows(drafts + 3, logit_rows=drafts + 1)
        start = time.perf_counter()
        self.prefill(prompt_ids, reuse_cache)
        stats.prefill_seconds = time.perf_counter() - start
        generated = result.tokens
        result.stop_reason = "max_new_tokens"
        while len(generated) < max_new_tokens:
            if self.position >= self.max_length:
                result.stop_reason = "context"
                break
            budget = min(drafts, max_new_tokens - len(generated) - 1, self.max_length - 1 - self.position)
            draft = self.draft(budget, settings.serial_parallel_transition, params, rng, settings.draft_stop_threshold)
            target_probs = TargetProbs(self.verify(draft), params)  # p_T .. p_{T+D}, rows on demand
            num_accepted, bonus = accept(draft.tokens, draft.probs, target_probs, params, rng)
            new = self.commit(draft, num_accepted, bonus)
            stats.record(len(draft.tokens), num_accepted)
            new, finished = cut_at_eos(new, self.eos)
            generated.extend(new)
            stats.new_tokens = len(generated)
            stats.wall_seconds = time.perf_counter() - start
            stats.first_token_seconds = stats.first_token_seconds or stats.wall_seconds
            yield new
            if finished:
                result.stop_reason = "eos"
                break
        stats.wall_seconds = time.perf_counter() - start

    # ---- phases ---------------------------------------------------------
    def prefill(self, prompt_ids: Sequence[int], reuse_cache: bool = False) -> None:
        """Run both stacks on ``prompt[:-1]`` in chunks; the last prompt token becomes pending.

        With ``reuse_cache``, the cached rows of the positions the prompt shares with the
        previous tokens are kept, except the last two body rows at most: the top states of
        ``T-1`` and ``T-2`` that drafting reads are not kept, so they are recomputed. An
        attending adapter's cache keeps its entries of the shared positions too; its first new
        entry reads the top state of the position before, so that position is recomputed (its
        own entry is not). The exact top state of ``T-1`` ends in ``prev_tops`` row 0 (zeros
        when the prompt has one token).
        """
        body = prompt_ids[:-1]
        shared = min(common_prefix(self.tokens[: self.position], body), len(body) - 1) if reuse_cache else 0
        if self.attends:
            # Entries past the shared positions belong to other tokens; the queued ones are dropped.
            self.draft_head.kv.rewind_to(min(shared, self.draft_head.kv.length))
            self.adapter_rows = 0
            if self.drafting:  # positions without an entry (plain greedy ran, or only queued) are recomputed
                shared = self.draft_head.kv.length
        start = max(0, shared - 1)
        self.lower.kv.rewind_to(min(start, self.lower.kv.length))
        self.upper.kv.rewind_to(min(start, self.upper.kv.length))
        self.tokens = list(prompt_ids)
        self.buffers.ensure_rows(max(2, min(len(body), self.prefill_chunk)))  # 2: a padded one-row call
        self.buffers.prev_tops.array[:, 0] = 0  # no position before x_0: the reference's zeros
        for begin in range(self.lower.kv.length, len(body), self.prefill_chunk):
            chunk = body[begin:begin + self.prefill_chunk]
            self._run_lower(chunk, row=0)
            self._run_upper(len(chunk), num_logits=0)  # prefill needs top states only: no LM head
            if self.attends and self.drafting:
                cached = max(0, self.draft_head.kv.length - begin)  # rows whose entries the cache has
                self._adapt_prefill(cached, len(chunk))
            self._keep_exact(len(chunk) - 1)

    def draft(
        self,
        num_drafts: int,
        serial_parallel_transition: int,
        params: SamplingParams,
        rng: np.random.Generator,
        stop_threshold: float | None = None,
    ) -> Draft:
        """Serial drafts through the lower stack, then aligned drafts through the drafter graph.

        Every draft comes from the draft-head graph on ``h̄(T+j-1)`` and ``prev_tops`` row ``j-1``
        (the exact top state for ``j = 1``, then the previous step's drafted top state). With
        ``serial_parallel_transition`` 0 every draft is aligned: the chain starts at ``T-1``
        (``prev_hidden``, the exact ``h(T-1)``), whose drafted top state ``chain_top`` the first
        draft reads, as the reference does; at ``T = 0`` the first draft is serial.
        """
        buffers, draft = self.buffers, Draft()
        token = self.tokens[-1]
        serial = serial_parallel_transition if self.position > 0 else max(1, serial_parallel_transition)
        if serial == 0 and num_drafts > 0:
            self._start_chain_before()
        first_prev = buffers.chain_top if serial == 0 else buffers.prev_tops  # row 0: the first draft's prev_top
        for j in range(1, num_drafts + 1):
            if j <= serial:
                self._run_lower([token], row=j - 1)  # exact h(T+j-1) into hidden row j-1
                draft.exact = j
                rows = buffers.hidden
            else:
                self.embeddings.lookup([token], buffers.token_embeds[0])
                if j == 1:
                    source = buffers.prev_hidden.view(0, 1)  # h(T-1)
                else:
                    source = (buffers.hidden if j - 1 == serial else buffers.pseudo).view(j - 2, j - 1)
                self.drafter.run(source, buffers.pseudo.view(j - 1, j))  # ĥ(T+j-1)
                rows = buffers.pseudo
            if self.attends and j == 1:
                self._queue(rows.array[:, 0], first_prev.array[:, 0])  # after the exact rows queued at commit
                self._run_queued(buffers.prev_tops.view(1, 2))
            else:
                prev_view = first_prev.view(0, 1) if j == 1 else buffers.prev_tops.view(j - 1, j)
                self.draft_head.run(rows.view(j - 1, j), prev_view, buffers.prev_tops.view(j, j + 1))
            logits = buffers.draft_logits[0, 0]  # [V_d]
            q = self.draft_distribution(logits, params)
            if q is None:  # NaN/inf logits (broken drafter weights): nothing to draw a draft from
                break
            if stop_threshold is not None:
                confidence = softmax(logits).max() if params.greedy else q.max()
                if confidence < stop_threshold:
                    break
            token = choose(q, params, rng)
            draft.tokens.append(token)
            draft.probs.append(q)
        return draft

    def verify(self, draft: Draft) -> np.ndarray:
        """One batched target pass over positions ``T .. T+D``. Returns logits [D+1, V] (a view)."""
        sequence = [self.tokens[-1], *draft.tokens]
        if draft.exact < len(sequence):
            self._run_lower(sequence[draft.exact:], row=draft.exact)
        return self._run_upper(len(sequence), num_logits=len(sequence))

    def commit(self, draft: Draft, num_accepted: int, bonus: int) -> list[int]:
        """Append the accepted drafts and the bonus; cut both caches back to the valid length.

        The verify pass's top state of ``T+n`` becomes the exact top state for the next draft.
        """
        new = [*draft.tokens[:num_accepted], bonus]
        valid = self.position + num_accepted + 1  # positions T .. T+n now hold accepted tokens
        if self.attends and self.drafting:
            self._queue_exact_rows(valid, first_exact=draft.exact > 0)
        self.tokens.extend(new)
        self._keep_exact(num_accepted)
        self.lower.kv.rewind_to(valid)
        self.upper.kv.rewind_to(valid)
        return new

    def draft_distribution(self, logits: np.ndarray, params: SamplingParams) -> np.ndarray | None:
        """Processed draft distribution over the full vocabulary from draft-vocabulary logits [V_d];
        None for NaN/inf logits (:func:`spaf_edge.sampling.draft_distribution`)."""
        return draft_distribution(logits, params, self.draft_vocab, self.vocab_size)

    # ---- graph calls ----------------------------------------------------
    def _run_lower(self, tokens: Sequence[int], row: int) -> None:
        """Lower stack on ``tokens`` at the next positions; cutoff states into hidden rows ``row ..``."""
        new, buffers = len(tokens), self.buffers
        rows = self._call_rows(new)
        self.embeddings.lookup(tokens, buffers.embeds.array[0, :new])
        if rows > new:  # the padding row repeats the token; its output row (row + 1) is scratch
            buffers.embeds.array[0, new] = buffers.embeds.array[0, 0]
        self.lower.run(buffers.embeds.view(0, rows), rows, buffers.hidden.view(row, row + rows))
        self.lower.kv.rewind_to(self.lower.kv.length - (rows - new))

    def _run_upper(self, new: int, num_logits: int) -> np.ndarray:
        """Upper stack on hidden rows ``0 .. new-1``: top states of all, logits of the last ``num_logits``.

        Returns logits [num_logits, V] (a view of the buffer).
        """
        buffers = self.buffers
        rows = self._call_rows(new)
        # A padding row (hidden row 1, the padded lower call's scratch) comes last: asking for one
        # more logit row keeps the real row's logits in row 0.
        logit_rows = num_logits + (rows - new) if num_logits else 0
        self.upper.run(buffers.hidden.view(0, rows), rows, buffers.logits.view(0, logit_rows),
                       buffers.top_hidden.view(0, rows), logit_rows)
        self.upper.kv.rewind_to(self.upper.kv.length - (rows - new))
        return buffers.logits.array[0, :num_logits]

    def _call_rows(self, new: int) -> int:
        """Rows a stack call of ``new`` positions runs: two for one when padding (the cache keeps ``new``)."""
        return 2 if self.pad and new == 1 else new

    # ---- an attending adapter's cache ------------------------------------
    def _adapt_prefill(self, first: int, stop: int) -> None:
        """Adapter entries of prefill chunk rows ``first .. stop-1``, each reading its previous top state."""
        for row in range(first, stop):
            self._queue(self.buffers.hidden.array[:, row], self._top_before(row))
        if self.adapter_rows:
            self._run_queued(self.buffers.prev_tops.view(1, 2))  # its draft is not used: row 1 is scratch here

    def _top_before(self, row: int) -> np.ndarray:
        """The top state of the position before the last upper call's row ``row``: [1, H].

        Row 0's is ``prev_tops`` row 0 (``f(T-1)``, the previous chunk's last, or zeros at ``x_0``).
        """
        return self.buffers.prev_tops.array[:, 0] if row == 0 else self.buffers.top_hidden.array[:, row - 1]

    def _queue(self, hidden: np.ndarray, previous: np.ndarray) -> None:
        """Queue one row for the adapter's next call: a cutoff state and the top state before it ([1, H] each)."""
        rows = self.adapter_rows
        self.buffers.adapter_hidden.array[:, rows] = hidden
        self.buffers.adapter_prev.array[:, rows] = previous
        self.adapter_rows += 1

    def _run_queued(self, drafted_top: ort.OrtValue) -> None:
        """The draft head on the queued rows, at the adapter cache's next positions; the queue empties.

        Its draft logits and ``drafted_top`` (a [1, 1, H] view) are the last row's.
        """
        rows, self.adapter_rows = self.adapter_rows, 0
        buffers = self.buffers
        self.draft_head.run(buffers.adapter_hidden.view(0, rows), buffers.adapter_prev.view(0, rows), drafted_top, rows)

    def _queue_exact_rows(self, valid: int, first_exact: bool) -> None:
        """At commit (before ``_keep_exact``): drop the chain's drafted entries and queue positions ``.. valid-1``.

        Entries past ``T`` are drafted, and so is ``T``'s unless the first draft was serial
        (``first_exact``). Verify rows ``r`` hold ``h(T+r)`` and ``f(T+r)``; ``prev_tops`` row 0
        still holds ``f(T-1)``.
        """
        buffers, kv, start = self.buffers, self.draft_head.kv, self.position
        kv.rewind_to(min(kv.length, start + int(first_exact)))
        for position in range(kv.length + self.adapter_rows, valid):
            row = position - start
            self._queue(buffers.hidden.array[:, row], self._top_before(row))

    def _start_chain_before(self) -> None:
        """``chain_top`` = the drafted top of ``T-1`` from its exact states, ``final_norm(a(h(T-1), f(T-2)))``.

        An attending adapter computes it with its queued rows, which end at ``T-1`` (re-queued
        from the cache when none are queued), so that entry stays exact. Its draft is not used.
        """
        buffers = self.buffers
        if not self.attends:
            self.draft_head.run(buffers.prev_hidden.view(0, 1), buffers.prev_top2.view(0, 1),
                                buffers.chain_top.view(0, 1))
            return
        if self.adapter_rows == 0:
            self.draft_head.kv.rewind_to(self.draft_head.kv.length - 1)
            self._queue(buffers.prev_hidden.array[:, 0], buffers.prev_top2.array[:, 0])
        self._run_queued(buffers.chain_top.view(0, 1))

    def _keep_exact(self, row: int) -> None:
        """At the end of an upper call: the states of its row ``row`` become those of ``T-1``.

        ``prev_tops`` row 0 gets ``f(T-1)``, ``prev_hidden`` ``h(T-1)``, and ``prev_top2`` ``f(T-2)``
        (the row before, or the previous ``f(T-1)`` when ``row`` is 0).
        """
        buffers = self.buffers
        buffers.prev_top2.array[:, 0] = self._top_before(row)
        buffers.prev_tops.array[:, 0] = buffers.top_hidden.array[:, row]
        buffers.prev_hidden.array[:, 0] = buffers.hidden.array[:, row]


def cut_at_eos(tokens: list[int], eos: frozenset[int]) -> tuple[list[int], bool]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1], True
    return tokens, False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
