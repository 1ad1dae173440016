"""The four graphs of an export folder (docs/export_format.md), built from a SpAFModel.

``lower`` and ``upper`` are the two halves of the base (KV-cached); ``drafter`` is one
AlignmentHead step and ``draft_head`` the adapter + final norm + draft LM head on one
state. Splitting the draft head off keeps it out of prefill, verify and plain decoding.
``upper`` computes logits for its last ``num_logits`` positions only: prefill asks for none.

No graph gathers token embeddings: ``lower`` and ``drafter`` take embedding rows, which
the runtime reads from ``embeddings.bin`` (format 4). A tied LM head used by ``upper``
alone (the draft head has its own draft-vocabulary rows) is then ``upper``'s private
initializer, which ONNX Runtime prepacks; its bytes stay in ``embeddings.bin``
(:attr:`GraphPlan.placements`), so the folder holds the table once. An int4/int8 export
(format 5) quantizes the table and every LM head: the tied head is a MatMulNBits node on
the quantized rows of ``embeddings.bin`` (:mod:`spaf_edge.core.embedding_layout`). The stacks take
``tree_positions`` and ``tree_bias`` (format 6), so one verify pass can run a draft tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from spaf_edge.core import io_names
from spaf_edge.core.embedding_layout import EmbeddingLayout
from spaf_edge.exporters.drafters import (
    ADAPTER_BUILDERS,
    ALIGNMENT_HEAD_BUILDERS,
    FUSION_BUILDERS,
    builder_for,
)
from spaf_edge.exporters.graph_builder import GraphBuilder, node_path
from spaf_edge.exporters.layers import (
    AttentionShape,
    HeadBlocks,
    QuantizedHead,
    make_decoder_layers,
    make_last_rows,
    make_lm_head,
    make_rms_norm,
    make_rotary_caches,
    make_skip_rms_norm,
    to_numpy,
)
from spaf_edge.exporters.quantize import ACCURACY_LEVEL, quantize_rows
from spaf_edge.model import SpAFModel

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
LM_HEAD_BIAS = "lm_head.bias"
DRAFT_HEAD = "spaf.draft_head.weight"
DRAFT_HEAD_BIAS = "spaf.draft_head.bias"
FINAL_NORM = "model.norm"
PACKED, SCALES = ".packed", ".scales"  # name suffixes of a quantized head's weights
HEAD_BLOCK_BYTES = 16 * 2**20  # a private LM head is split into row blocks of at most this size
PAGE = 4096  # block offsets in embeddings.bin stay page-aligned (ONNX Runtime can map them)


@dataclass
class GraphPlan:
    """What every graph builder needs to know about one export."""

    model: SpAFModel
    exit_layer: int  # k
    dtype: np.dtype
    max_length: int
    quantization: str | None = None  # None | "int8" | "int4": also the LM heads and embeddings.bin

    def __post_init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # weight name -> byte offset in embeddings.bin for weights that are rows of the table
        self.placements: dict[str, int] = {EMBED: 0}

    def array(self, name: str, tensor) -> np.ndarray:
        """A weight used by several graphs, converted once (and kept as one array)."""
        if name not in self._arrays:
            self._arrays[name] = to_numpy(tensor).astype(self.dtype, copy=False)
        return self._arrays[name]

    @property
    def base(self):
        return self.model.base

    @property
    def config(self):
        return self.model.base.config

    @property
    def eps(self) -> float:
        return float(self.config.rms_norm_eps)

    @property
    def shape(self) -> AttentionShape:
        config = self.config
        return AttentionShape(
            config.num_attention_heads, config.num_key_value_heads, self.model.arch.head_dim(config),
            self.max_length, pad_row=True, tree=True,
        )

    @property
    def draft_vocab_size(self) -> int:
        return int(self.model.draft_vocab.numel()) or self.config.vocab_size

    def new_builder(self, name: str) -> GraphBuilder:
        return GraphBuilder(name=name, dtype=np.dtype(self.dtype))

    def kv_inputs(self, b: GraphBuilder, layer_ids: Sequence[int | str], shape: list[int] | None = None) -> None:
        """GroupQueryAttention's length inputs and the past KV inputs of ``layer_ids`` (default shape: the base's)."""
        b.input(io_names.SEQLENS_K, TensorProto.INT32, [1])
        b.input(io_names.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])
        for past_k, past_v, _, _ in io_names.kv_names(layer_ids):
            b.input(past_k, b.float_type, shape or self.kv_shape)
            b.input(past_v, b.float_type, shape or self.kv_shape)

    def tree_inputs(self, b: GraphBuilder) -> None:
        """The stacks' tree inputs (format 6): per-row rotary positions and the ancestor mask among the rows."""
        b.input(io_names.TREE_POSITIONS, TensorProto.INT64, [1, "sequence_length"])
        b.input(io_names.TREE_BIAS, b.float_type, [1, 1, "sequence_length", "sequence_length"])

    def kv_outputs(self, b: GraphBuilder, layer_ids: Sequence[int | str], shape: list[int] | None = None) -> None:
        for _, _, present_k, present_v in io_names.kv_names(layer_ids):
            b.output(present_k, b.float_type, shape or self.kv_shape)
            b.output(present_v, b.float_type, shape or self.kv_shape)

    @property
    def kv_shape(self) -> list[int]:
        shape = self.shape
        return [1, shape.kv_heads, shape.max_length, shape.head_dim]

    # ---- embedding and LM head -----------------------------------------
    def embedding_table(self) -> np.ndarray:
        """The [V, H] embedding in the export dtype: the rows of ``embeddings.bin`` before quantization."""
        return self.array(EMBED, self.model.arch.embed_tokens(self.base).weight)

    @property
    def embedding_layout(self) -> EmbeddingLayout:
        config = self.config
        return EmbeddingLayout.for_export(config.vocab_size, config.hidden_size, self.dtype.name, self.quantization)

    def quantized(self, name: str, rows) -> tuple[np.ndarray, np.ndarray]:
        """(packed, scales) of the float rows ``rows`` (a [N, H] tensor), quantized once per name."""
        if name not in self._quantized:
            self._quantized[name] = quantize_rows(to_numpy(rows), self.embedding_layout)
        return self._quantized[name]

    def embedding_bytes(self) -> list[np.ndarray]:
        """The pieces of ``embeddings.bin`` in order, with the padding before the scales (layout above)."""
        if not self.quantization:
            return [self.embedding_table()]
        packed, scales = self.quantized(EMBED, self.model.arch.embed_tokens(self.base).weight)
        padding = np.zeros(self.embedding_layout.scales_offset - packed.nbytes, dtype=np.uint8)
        return [packed, padding, scales]

    def quantized_head(self, b: GraphBuilder, name: str, rows, bias) -> QuantizedHead:
        """LM-head ``rows`` [N, H] as a MatMulNBits head; the tied full head reads embeddings.bin's bytes."""
        packed, scales = self.quantized(name, rows)
        layout = self.embedding_layout
        if name == EMBED:
            self.placements[EMBED + PACKED] = 0
            self.placements[EMBED + SCALES] = layout.scales_offset
        bias_name = b.weight(f"{name}.bias", bias) if bias is not None else None
        return QuantizedHead(b.weight(name + PACKED, packed, packed=True), b.weight(name + SCALES, scales.reshape(-1)),
                             bias_name, layout.hidden_size, layout.bits, layout.block_size, ACCURACY_LEVEL)

    @property
    def tied(self) -> bool:
        head, embed = self.model.arch.lm_head(self.base), self.model.arch.embed_tokens(self.base)
        return head.weight.data_ptr() == embed.weight.data_ptr()

    @property
    def head_is_private(self) -> bool:
        """Only ``upper`` uses the full LM head: the draft head has draft-vocabulary rows of its own."""
        return self.model.draft_vocab.numel() > 0

    def lm_head_blocks(self, b: GraphBuilder) -> HeadBlocks | QuantizedHead:
        """The full LM head as (weight [rows, H], bias) blocks; a tied head is the embedding table itself.

        A head shared with the draft head stays one tensor (one shared buffer, read in place).
        A private one is split into row blocks of at most :data:`HEAD_BLOCK_BYTES`: ONNX
        Runtime prepacks and frees each block in turn, so creating the session never holds
        the whole unpacked head next to the packed one. Tied blocks are placed in
        ``embeddings.bin`` at their rows' offsets.
        """
        head = self.model.arch.lm_head(self.base)
        name = EMBED if self.tied else LM_HEAD
        bias = to_numpy(head.bias) if head.bias is not None else None
        if self.quantization:
            return self.quantized_head(b, name, head.weight, bias)
        table = self.embedding_table() if self.tied else self.array(LM_HEAD, head.weight)
        if not self.head_is_private:
            return [(b.weight(name, table), b.weight(LM_HEAD_BIAS, bias) if bias is not None else None)]
        row_bytes = table.shape[1] * table.dtype.itemsize
        rows = block_rows(row_bytes)
        blocks = []
        for start in range(0, table.shape[0], rows):
            stop = min(start + rows, table.shape[0])
            suffix = f".rows_{start}_{stop}"
            if self.tied:
                self.placements[name + suffix] = start * row_bytes
            block_bias = b.weight(LM_HEAD_BIAS + suffix, bias[start:stop]) if bias is not None else None
            blocks.append((b.weight(name + suffix, table[start:stop]), block_bias))
        return blocks

    @property
    def adapter(self):
        return self.model.adapter(self.exit_layer)

    @property
    def reads_top_state(self) -> bool:
        return self.model.reads_top_state(self.exit_layer)

    @property
    def adapter_attention(self) -> dict[str, int] | None:
        """The attending adapter's KV sizes (the manifest's ``adapter_attention``), None for other kinds."""
        if not self.model.attends(self.exit_layer):
            return None
        return {"num_heads": int(self.adapter.num_heads), "head_dim": int(self.adapter.head_dim)}

    def draft_head_blocks(self, b: GraphBuilder) -> HeadBlocks | QuantizedHead:
        """LM-head rows of the draft vocabulary (the full, shared head when there is none).

        The rows are used by the draft-head graph only, so they stay a private initializer
        that ONNX Runtime can prepack (quantized like the full head in an int4/int8 export).
        """
        vocab = self.model.draft_vocab
        if vocab.numel() == 0:
            return self.lm_head_blocks(b)
        head = self.model.arch.lm_head(self.base)
        ids = vocab.to(head.weight.device)
        if self.quantization:
            bias = to_numpy(head.bias[ids]) if head.bias is not None else None
            return self.quantized_head(b, DRAFT_HEAD, head.weight[ids], bias)
        name = b.weight(DRAFT_HEAD, to_numpy(head.weight[ids]))
        bias = b.weight(DRAFT_HEAD_BIAS, to_numpy(head.bias[ids])) if head.bias is not None else None
        return [(name, bias)]


def block_rows(row_bytes: int) -> int:
    """Rows per LM-head block: at most HEAD_BLOCK_BYTES, a whole number of pages (at least one block of them)."""
    step = PAGE // math.gcd(PAGE, row_bytes)
    return max(step, HEAD_BLOCK_BYTES // row_bytes // step * step)


def build_lower(plan: GraphPlan, on_layer: Callable[[], None] | None = None) -> GraphBuilder:
    """Layers 0..k-1 on embedding rows; cutoff states of every position."""
    b = plan.new_builder("spaf_lower")
    hidden_size = plan.config.hidden_size
    hidden = b.input(io_names.INPUTS_EMBEDS, b.float_type, [1, "sequence_length", hidden_size])
    layer_ids = range(0, plan.exit_layer)
    plan.kv_inputs(b, layer_ids)
    plan.tree_inputs(b)
    rotary = make_rotary_caches(b, plan.model.arch.rotary(plan.base), plan.shape.head_dim, plan.max_length)
    layers = plan.model.arch.layers(plan.base)
    mlp_out, residual = make_decoder_layers(b, hidden, layers, layer_ids, plan.eps, plan.shape, rotary, on_layer)
    b.make_node("Add", [mlp_out, residual], f"/model/layers.{plan.exit_layer - 1}/residual",
                outputs=[io_names.CUTOFF_HIDDEN])
    b.output(io_names.CUTOFF_HIDDEN, b.float_type, [1, "sequence_length", hidden_size])
    plan.kv_outputs(b, layer_ids)
    return b


def build_upper(plan: GraphPlan, on_layer: Callable[[], None] | None = None) -> GraphBuilder:
    """Layers k..L-1 + final norm + LM head: top states of every position, logits of the last ``num_logits``.

    For a fusing adapter kind the ``top_hidden`` output is the fusion it reads (the LM head
    still reads the top state itself).
    """
    b = plan.new_builder("spaf_upper")
    config = plan.config
    hidden = b.input(io_names.CUTOFF_HIDDEN, b.float_type, [1, "sequence_length", config.hidden_size])
    num_logits = b.input(io_names.NUM_LOGITS, TensorProto.INT64, [1])
    layer_ids = range(plan.exit_layer, config.num_hidden_layers)
    plan.kv_inputs(b, layer_ids)
    plan.tree_inputs(b)
    rotary = make_rotary_caches(b, plan.model.arch.rotary(plan.base), plan.shape.head_dim, plan.max_length)
    layers = plan.model.arch.layers(plan.base)
    taps = dict.fromkeys(plan.model.fused_layers(plan.exit_layer))
    mlp_out, residual = make_decoder_layers(b, hidden, layers, layer_ids, plan.eps, plan.shape, rotary, on_layer,
                                            taps)
    # A fusing adapter reads a fusion of the top state and the tapped states; the LM head, the top state.
    top = io_names.TOP_HIDDEN if not taps else f"{node_path(FINAL_NORM)}/top_state"
    make_skip_rms_norm(b, mlp_out, residual, FINAL_NORM, plan.model.arch.final_norm(plan.base).weight, plan.eps,
                       normed=top)
    if taps:
        fused = builder_for(FUSION_BUILDERS, plan.adapter, "layer fusion")(
            b, top, list(taps.values()), plan.adapter, f"spaf.adapters.{plan.exit_layer}")
        b.make_node("Identity", [fused], "/spaf/fusion/top_hidden", outputs=[io_names.TOP_HIDDEN])
    last = make_last_rows(b, top, num_logits, "/lm_head/last_rows")  # [1, num_logits, H]
    make_lm_head(b, last, "/lm_head", plan.lm_head_blocks(b), config.vocab_size, io_names.LOGITS)
    b.output(io_names.LOGITS, TensorProto.FLOAT, [1, "num_logits", config.vocab_size])
    b.output(io_names.TOP_HIDDEN, b.float_type, [1, "sequence_length", config.hidden_size])
    plan.kv_outputs(b, layer_ids)
    return b


def build_drafter(plan: GraphPlan) -> GraphBuilder:
    """One aligned-draft step: ``ĥ = AH(e(d), h̄)`` on the embedding row ``e(d)``."""
    b = plan.new_builder("spaf_drafter")
    hidden_size = plan.config.hidden_size
    embeds = b.input(io_names.TOKEN_EMBEDS, b.float_type, [1, 1, hidden_size])
    prev_hidden = b.input(io_names.PREV_HIDDEN, b.float_type, [1, 1, hidden_size])
    head = plan.model.alignment_heads[str(plan.exit_layer)]
    pseudo = builder_for(ALIGNMENT_HEAD_BUILDERS, head, "alignment head")(
        b, embeds, prev_hidden, head, f"spaf.alignment_heads.{plan.exit_layer}"
    )
    b.make_node("Identity", [pseudo], "/spaf/drafter/pseudo_hidden", outputs=[io_names.PSEUDO_HIDDEN])
    b.output(io_names.PSEUDO_HIDDEN, b.float_type, [1, 1, hidden_size])
    return b


def build_draft_head(plan: GraphPlan) -> GraphBuilder:
    """One draft step's head: ``f' = final_norm(a(h̄, f))`` and ``head_rows(f')`` over the draft vocabulary.

    Inputs ``draft_hidden`` [1, 1, H] and, for adapters that read it, ``prev_top`` [1, 1, H];
    outputs ``draft_logits`` float32 [1, 1, V_d] and ``drafted_top`` [1, 1, H]. An attending
    adapter takes [1, S, H] rows at the positions after its KV cache's (the GroupQueryAttention
    length inputs and ``past/present`` of :data:`io_names.ADAPTER_KV`, shared in place like
    the stacks'); the outputs are its last row's.
    """
    b = plan.new_builder("spaf_draft_head")
    hidden_size = plan.config.hidden_size
    attention = plan.adapter_attention
    rows = "sequence_length" if attention else 1
    hidden = b.input(io_names.DRAFT_HIDDEN, b.float_type, [1, rows, hidden_size])
    prev_top = b.input(io_names.PREV_TOP, b.float_type, [1, rows, hidden_size]) if plan.reads_top_state else None
    extra = {}
    if attention:
        kv_shape = [1, attention["num_heads"], plan.max_length, attention["head_dim"]]
        plan.kv_inputs(b, [io_names.ADAPTER_KV], kv_shape)
        rotary = make_rotary_caches(b, plan.model.arch.rotary(plan.base), attention["head_dim"], plan.max_length)
        extra = {"rotary": rotary, "kv": io_names.kv_names([io_names.ADAPTER_KV])[0]}
    adapted = builder_for(ADAPTER_BUILDERS, plan.adapter, "adapter")(
        b, hidden, prev_top, plan.adapter, f"spaf.adapters.{plan.exit_layer}", **extra
    )
    if attention:
        adapted = make_last_rows(b, adapted, b.int64s("/spaf/draft_head/one_row", [1]), "/spaf/draft_head/last_row")
    make_rms_norm(b, adapted, FINAL_NORM, plan.model.arch.final_norm(plan.base).weight, plan.eps,
                  output=io_names.DRAFTED_TOP)
    make_lm_head(b, io_names.DRAFTED_TOP, "/spaf/draft_head", plan.draft_head_blocks(b), plan.draft_vocab_size,
                 io_names.DRAFT_LOGITS)
    b.output(io_names.DRAFT_LOGITS, TensorProto.FLOAT, [1, 1, plan.draft_vocab_size])
    b.output(io_names.DRAFTED_TOP, b.float_type, [1, 1, hidden_size])
    if attention:
        plan.kv_outputs(b, [io_names.ADAPTER_KV], kv_shape)
    return b
