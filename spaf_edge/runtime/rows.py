"""Row invariance of the two stacks on this device: does a verify row get a decode step's bits?

Speculative greedy output equals plain greedy output only if the target pass gives every
row of a multi-row verify call exactly the bits that a one-row decode step gives it: at a
near-tie, one flipped last bit picks another token. Kernels do not promise that. On
ONNX Runtime's CPU provider, GroupQueryAttention takes another path for one query row than
for several, and some ``MatMulNBits`` configurations compute one row differently from many
(``benchmarks/engine/nbits_rows.py``), so results depend on the CPU and the export.

:func:`check_rows` measures it on the engine's own graphs at load: it runs the same
positions as one-row calls, as two-row calls whose second row is padding, and as calls of
2..9 and ``max_rows`` rows, and compares every row's cutoff state and logits bit for bit (the
top state only feeds drafts, which never change the output; for a ``layer_fusion`` adapter
it is a fusion the LM head does not read); the padded calls only where the plain ones differ
(or padding is forced). The decoder then runs one-row stack calls as two-row calls (``pad``)
when only that keeps every call on one kernel path. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spaf_edge.decoding.loop import Proposal
from spaf_edge.decoding.tree import DraftTree

ROW_CALLS = ("auto", "native", "padded")  # auto: choose from the measurement
PROBE_PROMPT = 5  # positions prefilled before the compared rows
MAX_ROWS = 17  # widest verify call compared: a default lookup chain of 16 tokens + the pending token
EVERY_SIZE = 9  # calls of every size up to this are compared, and the widest one


@dataclass(frozen=True)
class RowCheck:
    """What :func:`check_rows` found, and the mode the decoder runs in."""

    native: bool  # every multi-row call matches one-row calls
    padded: bool | None  # every multi-row call matches two-row calls (one real row + padding); None: not
    # measured, because plain one-row calls already match and padding was not asked for
    pad: bool  # the decoder runs one-row stack calls as two rows
    rows: int  # widest call compared (0: the context was too short to compare any)

    @property
    def lossless(self) -> str:
        """``exact``: verify rows get decode-step bits in the chosen mode; ``near``: only up to rounding."""
        return "exact" if (self.padded if self.pad else self.native) is True else "near"

    def describe(self) -> str:
        mode = "one-row calls run as two rows" if self.pad else "calls of any row count"
        return f"lossless: {self.lossless} ({mode}; {self.finding})"

    @property
    def finding(self) -> str:
        if not self.rows:
            return "the context is too short to check row invariance"
        if self.native:
            return "verify rows get decode-step bits on this device"
        if self.padded:
            return "one row rounds differently from several on this device; two-row calls match any count"
        return "no call shape gives verify rows decode-step bits on this device"


def check_rows(decoder, row_calls: str = "auto", max_rows: int = MAX_ROWS) -> RowCheck:
    """Compare one-row, padded and multi-row calls of ``decoder``'s stacks; set ``decoder.pad``.

    Leaves the decoder with empty caches and no tokens. ``row_calls``: ``auto`` pads only
    when padding is exact and plain calls are not; ``native`` / ``padded`` force the mode
    (the check still reports whether it is exact).
    """
    if row_calls not in ROW_CALLS:
        raise ValueError(f"row_calls={row_calls!r}: expected one of {ROW_CALLS}")
    # room for the prompt, the widest call and the rows padding writes past it
    rows = min(max_rows, decoder.lower.kv.max_length - PROBE_PROMPT - 3)
    if rows < 2:  # a context too short to compare multi-row calls: nothing is claimed
        decoder.pad = row_calls == "padded"
        return RowCheck(native=False, padded=False, pad=decoder.pad, rows=0)
    ids = probe_tokens(decoder.vocab_size, PROBE_PROMPT + 1 + rows)
    decoder.buffers.ensure_rows(rows + 2, logit_rows=rows + 1)
    decoder.pad = False
    decoder.prefill(ids[: PROBE_PROMPT + 1])
    start = decoder.position
    tokens = ids[PROBE_PROMPT: PROBE_PROMPT + rows]
    try:
        sizes = sorted({*range(2, min(rows, EVERY_SIZE) + 1), rows})
        together = {size: _all_at_once(decoder, start, tokens[:size]) for size in sizes}
        single = _row_by_row(decoder, start, tokens, pad=False)
        native = all(_same(together[size], single, size) for size in sizes)
        padded = None  # measured only where it may be used: plain calls differ, or padding is forced
        if not native or row_calls == "padded":
            paired = _row_by_row(decoder, start, tokens, pad=True)
            padded = all(_same(together[size], paired, size) for size in sizes)
    finally:
        decoder.reset()
    pad = {"auto": bool(padded) and not native, "native": False, "padded": True}[row_calls]
    decoder.pad = pad
    return RowCheck(native=native, padded=padded, pad=pad, rows=rows)


TREE_MODES = ("auto", "off", "near")  # auto: trees where they are exact; near: also where they are not


TREE_PROMPT = 40  # positions before the compared tree: long enough for the kernels' blocked paths
TREE_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 3)  # root, three children, grandchildren: nodes off the first path


def check_tree(decoder) -> bool:
    """Does every node of a draft tree get the bits of the same node in a chain?

    A tree (:data:`TREE_PARENTS`) is verified in one call after a prompt of :data:`TREE_PROMPT`
    positions, and each node's cutoff state and logits are compared with the last row of a chain
    of its path. Leaves the decoder with empty caches and no tokens.
    """
    nodes = len(TREE_PARENTS)
    if not decoder.verifies_trees or decoder.lower.kv.max_length < TREE_PROMPT + nodes + 3:
        return False
    ids = probe_tokens(decoder.vocab_size, TREE_PROMPT + nodes)
    decoder.buffers.ensure_rows(nodes + 1, logit_rows=nodes)
    decoder.tree_inputs.ensure_rows(nodes)
    decoder.prefill(ids[: TREE_PROMPT + 1])
    start = decoder.position
    tree = DraftTree(ids[TREE_PROMPT])
    for node, parent in enumerate(TREE_PARENTS[1:], start=1):
        tree.add(ids[TREE_PROMPT + node], parent)
    try:
        together = _states(decoder, decoder.verify(Proposal(tree)), range(nodes))
        for node in range(nodes):
            _rewind(decoder, start)
            path = [0, *tree.path_to(node)]
            chain = DraftTree.from_chain([int(tree.token(n)) for n in path])
            alone = _states(decoder, decoder.verify(Proposal(chain)), [len(path) - 1])
            if not np.array_equal(together[node], alone[0]):
                return False
        return True
    finally:
        decoder.reset()


def _states(decoder, logits: np.ndarray, rows) -> list[np.ndarray]:
    """The last upper call's ``rows``: each row's cutoff state and logits, in one float32 array."""
    hidden = decoder.buffers.hidden.array
    return [np.concatenate([hidden[0, r].ravel().astype(np.float32), logits[r]]) for r in rows]


def probe_tokens(vocab_size: int, count: int) -> list[int]:
    """``count`` token ids spread over the vocabulary, the same every time (the load-time checks' inputs)."""
    return [(7919 * i + 101) % vocab_size for i in range(count)]


def _row_by_row(decoder, start: int, tokens: list[int], pad: bool) -> list[np.ndarray]:
    """Cutoff states and logits of ``tokens`` at ``start ..``, one decode step each."""
    decoder.pad = pad
    _rewind(decoder, start)
    out = []
    for token in tokens:
        decoder.run_lower([token], row=0)
        out += _states(decoder, decoder.run_upper(1, num_logits=1), [0])
    decoder.pad = False
    return out


def _all_at_once(decoder, start: int, tokens: list[int]) -> list[np.ndarray]:
    """The same rows from one call of ``len(tokens)`` rows, as a verify pass runs them."""
    _rewind(decoder, start)
    n = len(tokens)
    decoder.run_lower(tokens, row=0)
    return _states(decoder, decoder.run_upper(n, num_logits=n), range(n))


def _same(together: list[np.ndarray], reference: list[np.ndarray], size: int) -> bool:
    return all(np.array_equal(together[r], reference[r]) for r in range(size))


def _rewind(decoder, start: int) -> None:
    decoder.lower.kv.rewind_to(start)
    decoder.upper.kv.rewind_to(start)
