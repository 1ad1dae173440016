"""The four export graphs behind persistent IOBindings (docs/export_format.md, "Graph IO").

Each wrapper owns one session and one IOBinding (:class:`Binding`). KV buffers and fixed-size
outputs are bound once; per call only the row views of host buffers that change with the
chunk size are rebound, from cached OrtValues, and on device providers the small inputs,
whose fresh values the provider then copies. On the CPU provider every
host buffer is shared with ONNX Runtime without copies; on device providers ORT copies
the small inputs in and the outputs out (hidden states and logits: a few KB per step),
while the KV caches never leave the device.

Stacks of a format-6 export also take a call's tree inputs (:class:`TreeInputs`): a verify
pass may then run a draft tree, each row at its own position and attending to the cache and
its ancestors only. A chain binds positions ``P ..`` and a zero mask through the same inputs,
so chains and trees take one kernel path. Stacks of a format-5 export have no tree inputs
(told apart by the graph's inputs, which the load-time signature check ties to the
manifest's ``tree_attention``) and run chains only. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from spaf_edge.core.io_names import (
    CUTOFF_HIDDEN,
    DRAFT_HIDDEN,
    DRAFT_LOGITS,
    DRAFTED_TOP,
    INPUTS_EMBEDS,
    LOGITS,
    NUM_LOGITS,
    PREV_HIDDEN,
    PREV_TOP,
    PSEUDO_HIDDEN,
    SEQLENS_K,
    TOKEN_EMBEDS,
    TOP_HIDDEN,
    TOTAL_SEQUENCE_LENGTH,
    TREE_BIAS,
    TREE_POSITIONS,
)
from spaf_edge.decoding.tree import masked_value
from spaf_edge.runtime.kv import KVCache


class Binding:
    """A session's IOBinding that skips binding a name to the OrtValue it already has, where that is a no-op.

    On the CPU provider ONNX Runtime reads and writes the bound host buffers in place, so binding
    the same OrtValue again changes nothing, yet each call costs the Python around the graph runs
    (tens of µs a step: that code runs with caches the weights have just evicted). Device
    providers copy a host input when it is bound, so there inputs are rebound every call.
    ``get_outputs`` and the raw binding (``raw``) stay available.
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        self.raw = session.io_binding()
        self.rebind_inputs = session.get_providers()[0] != "CPUExecutionProvider"
        self._inputs: dict[str, ort.OrtValue] = {}
        self._outputs: dict[str, ort.OrtValue] = {}

    def input(self, name: str, value: ort.OrtValue) -> None:
        if self.rebind_inputs or self._inputs.get(name) is not value:
            self.raw.bind_ortvalue_input(name, value)
            self._inputs[name] = value

    def output(self, name: str, value: ort.OrtValue) -> None:
        if self._outputs.get(name) is not value:
            self.raw.bind_ortvalue_output(name, value)
            self._outputs[name] = value

    def get_outputs(self) -> list[ort.OrtValue]:
        return self.raw.get_outputs()


class _Positions:
    """The GroupQueryAttention length inputs of a call: ``seqlens_k = P+S-1``, ``total = P+S``."""

    def __init__(self) -> None:
        self.seqlens = np.zeros(1, dtype=np.int32)  # [1]
        self.total = np.zeros((), dtype=np.int32)  # []
        self.seqlens_value = ort.OrtValue.ortvalue_from_numpy(self.seqlens)
        self.total_value = ort.OrtValue.ortvalue_from_numpy(self.total)

    def bind(self, binding: Binding, past: int, new: int) -> None:
        self.seqlens[0] = past + new - 1
        self.total[()] = past + new
        binding.input(SEQLENS_K, self.seqlens_value)  # bound once on CPU; device providers copy the fresh values
        binding.input(TOTAL_SEQUENCE_LENGTH, self.total_value)


class TreeInputs:
    """A stack call's tree inputs, preallocated and bound without copies (export format 6).

    Describes the call's ``S`` rows: :meth:`chain` (row ``i`` one position after row
    ``i-1``, a zero mask) or :meth:`tree` (each row's parent among the earlier rows). At bind
    time the graph adds its cache's length ``P``: ``tree_positions = P + depth`` [1, S], and
    ``tree_bias`` [1, 1, S, S] is 0 where the key row is the query row or one of its
    ancestors, :func:`masked_value` elsewhere. Host arrays hold ``rows`` rows; the bias is one
    flat array whose ``S*S`` prefix is viewed as [1, 1, S, S], so every call size has a
    contiguous view (cached as OrtValues, like :class:`HostBuffer`'s). One object can serve
    both stacks of a verify pass, which run the same rows at the same cache length.
    """

    def __init__(self, rows: int, dtype: type) -> None:
        self.dtype = np.dtype(dtype)  # the stacks' float type (the manifest dtype)
        self.new = 0  # S: rows of the described call
        self.is_chain = True  # row i's parent is row i-1: what a format-5 stack can run
        self._allocate(rows)

    def _allocate(self, rows: int) -> None:
        self.new, self.is_chain = 0, True  # contents dropped
        self.depths = np.zeros(rows, dtype=np.int64)  # [R]
        self.positions = np.zeros((1, rows), dtype=np.int64)  # [1, R]: P + depths, written at bind time
        self.bias = np.zeros(rows * rows, dtype=self.dtype)  # [R*R]: [S, S] row-major in the first S*S
        self._views: dict[int, tuple[ort.OrtValue, ort.OrtValue]] = {}

    @property
    def rows(self) -> int:
        return len(self.depths)

    def ensure_rows(self, rows: int) -> None:
        """Room for calls of ``rows`` rows (reallocates when it grows: describe the call afterwards)."""
        if rows > self.rows:
            self._allocate(rows)

    def chain(self, new: int) -> None:
        """``new`` rows in a chain: depths ``0 .. new-1``, a zero mask (the kernel's causal mask does the rest)."""
        if self.is_chain and self.new == new:
            return  # described already (the common case: every decode step and chain verify)
        self.ensure_rows(new)
        self.depths[:new] = np.arange(new)
        self.bias[: new * new] = 0
        self.new, self.is_chain = new, True

    def tree(self, parents: Sequence[int] | np.ndarray) -> None:
        """Rows as a tree: ``parents[i]`` is the row of row ``i``'s parent, ``< i``, or -1 for a row whose
        parent is the cache's last position (a root, depth 0; several roots make a forest)."""
        parents = np.asarray(parents, dtype=np.int64)
        new = len(parents)
        rows = np.arange(new)
        if new == 0 or (parents < -1).any() or (parents >= rows).any():
            raise ValueError(f"parents {parents.tolist()}: each must be -1 or an earlier row")
        self.ensure_rows(new)
        ancestors = np.zeros((new, new), dtype=bool)  # [query row, key row]: ancestor-or-self
        for row, parent in enumerate(parents.tolist()):
            if parent >= 0:
                ancestors[row] = ancestors[parent]  # parents come first: their row is complete
                self.depths[row] = self.depths[parent] + 1
            else:
                self.depths[row] = 0
            ancestors[row, row] = True
        bias = self.bias[: new * new].reshape(new, new)
        bias[...] = 0
        bias[~ancestors] = masked_value(self.dtype)
        self.new = new
        self.is_chain = bool(parents[0] == -1 and (parents[1:] == rows[:-1]).all())

    def bind(self, binding: Binding, past: int) -> None:
        """Bind the described call's inputs for a cache holding ``past`` positions."""
        new = self.new
        if past == 0 and not self.is_chain:
            # ONNX Runtime's CPU kernel takes a call without past rows for a prompt and then uses
            # position_ids[0] + row as each row's position: a tree would get wrong positions.
            raise ValueError("A draft tree needs at least one cached position (P >= 1); verify a chain at P = 0.")
        np.add(self.depths[:new], past, out=self.positions[0, :new])
        views = self._views.get(new)
        if views is None:
            views = (ort.OrtValue.ortvalue_from_numpy(self.positions[:, :new]),
                     ort.OrtValue.ortvalue_from_numpy(self.bias[: new * new].reshape(1, 1, new, new)))
            self._views[new] = views
        binding.input(TREE_POSITIONS, views[0])  # bound once on CPU; device providers copy the fresh values
        binding.input(TREE_BIAS, views[1])


class StackGraph:
    """A decoder stack with its own KV cache: ``lower.onnx`` or ``upper.onnx``.

    ``accepts_trees``: the graph has the tree inputs (format 6); calls without a
    :class:`TreeInputs` then bind a chain of their own.
    """

    def __init__(self, session: ort.InferenceSession, kv: KVCache) -> None:
        self.session = session
        self.kv = kv
        self.binding = Binding(session)
        kv.bind(self.binding.raw)
        self.positions = _Positions()
        self.accepts_trees = TREE_POSITIONS in {arg.name for arg in session.get_inputs()}
        self.chain_inputs = TreeInputs(2, kv.dtype) if self.accepts_trees else None  # what calls without a tree bind

    def _run(self, new: int, tree: TreeInputs | None) -> None:
        if tree is not None and tree.new != new:
            raise ValueError(f"the tree inputs describe {tree.new} rows, the call has {new}")
        if self.accepts_trees:
            if tree is None:
                tree = self.chain_inputs
                tree.chain(new)
            tree.bind(self.binding, self.kv.length)
        elif tree is not None and not tree.is_chain:
            raise ValueError(
                "This export's stacks verify chains only (export format 5, no tree inputs): re-export the model "
                "with this version of spaf-edge to verify draft trees."
            )
        self.positions.bind(self.binding, self.kv.length, new)
        self.session.run_with_iobinding(self.binding.raw)
        self.kv.advance(new)


class LowerGraph(StackGraph):
    """Layers ``0..k-1`` on embedding rows: cutoff states."""

    def run(
        self, inputs_embeds: ort.OrtValue, new: int, cutoff_hidden: ort.OrtValue, tree: TreeInputs | None = None
    ) -> None:
        # inputs_embeds: [1, S, H] -> cutoff_hidden: [1, S, H]; tree: the S rows' tree inputs (None: a chain)
        self.binding.input(INPUTS_EMBEDS, inputs_embeds)
        self.binding.output(CUTOFF_HIDDEN, cutoff_hidden)
        self._run(new, tree)


class UpperGraph(StackGraph):
    """Layers ``k..L-1`` + final norm + LM head: top states of every position, logits of the last few."""

    def __init__(self, session: ort.InferenceSession, kv: KVCache) -> None:
        super().__init__(session, kv)
        self.num_logits = np.zeros(1, dtype=np.int64)  # [1]
        self.num_logits_value = ort.OrtValue.ortvalue_from_numpy(self.num_logits)

    def run(
        self, cutoff_hidden: ort.OrtValue, new: int, logits: ort.OrtValue, top_hidden: ort.OrtValue, num_logits: int,
        tree: TreeInputs | None = None,
    ) -> None:
        # cutoff_hidden: [1, S, H] -> logits: [1, n, V] float32 (last n = num_logits positions), top_hidden: [1, S, H]
        # tree: the S rows' tree inputs (None: a chain)
        self.num_logits[0] = num_logits
        self.binding.input(NUM_LOGITS, self.num_logits_value)
        self.binding.input(CUTOFF_HIDDEN, cutoff_hidden)
        self.binding.output(LOGITS, logits)
        self.binding.output(TOP_HIDDEN, top_hidden)
        self._run(new, tree)


class DrafterGraph:
    """One aligned-draft step: ``ĥ = AH(e(d), h̄)``. No KV cache."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.binding = Binding(session)

    def run(self, token_embeds: ort.OrtValue, prev_hidden: ort.OrtValue, pseudo_hidden: ort.OrtValue) -> None:
        # token_embeds: [1, 1, H] e(d), prev_hidden: [1, 1, H] -> pseudo_hidden: [1, 1, H]
        self.binding.input(TOKEN_EMBEDS, token_embeds)
        self.binding.input(PREV_HIDDEN, prev_hidden)
        self.binding.output(PSEUDO_HIDDEN, pseudo_hidden)
        self.session.run_with_iobinding(self.binding.raw)


class DraftHeadGraph:
    """One draft step's head: ``f' = final_norm(a(h̄, f))`` and its draft logits.

    ``reads_top_state``: the graph has a ``prev_top`` input (the adapter reads ``f``);
    otherwise ``prev_top`` passed to :meth:`run` is ignored. ``kv``: the KV cache of an
    attending adapter (None for other kinds); the graph then takes rows at the positions
    after the cache's and outputs the last row's draft.
    """

    def __init__(
        self, session: ort.InferenceSession, draft_logits: ort.OrtValue, reads_top_state: bool,
        kv: KVCache | None = None,
    ) -> None:
        self.session = session
        self.binding = Binding(session)
        self.reads_top_state = reads_top_state
        self.kv = kv
        self.binding.output(DRAFT_LOGITS, draft_logits)  # [1, 1, V_d]
        if kv is not None:
            kv.bind(self.binding.raw)
            self.positions = _Positions()

    def run(self, draft_hidden: ort.OrtValue, prev_top: ort.OrtValue, drafted_top: ort.OrtValue, new: int = 1) -> None:
        # draft_hidden, prev_top: [1, S, H] (S = new: 1 unless the adapter attends)
        #   -> draft logits of the last row (bound buffer), drafted_top: [1, 1, H]
        self.binding.input(DRAFT_HIDDEN, draft_hidden)
        if self.reads_top_state:
            self.binding.input(PREV_TOP, prev_top)
        self.binding.output(DRAFTED_TOP, drafted_top)
        if self.kv is not None:
            self.positions.bind(self.binding, self.kv.length, new)
        self.session.run_with_iobinding(self.binding.raw)
        if self.kv is not None:
            self.kv.advance(new)
