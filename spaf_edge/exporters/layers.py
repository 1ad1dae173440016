"""Graph pieces of a Llama-shaped decoder, built from the PyTorch modules' weights.

Each ``make_*`` appends nodes to a :class:`GraphBuilder` and returns the name of its
output. Weights are named after the module they come from (HF names where one exists),
so a tensor used by several graphs has one name and is stored once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spaf_edge.core.io_names import (
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    TREE_BIAS,
    TREE_POSITIONS,
    past_key,
    past_value,
    present_key,
    present_value,
)
from spaf_edge.exporters.graph_builder import MS_DOMAIN, GraphBuilder, node_path


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    kv_heads: int
    head_dim: int
    max_length: int  # rows of the KV buffers and of the rotary caches
    pad_row: bool = False  # attention runs one more query row than the call has (make_group_query_attention)
    tree: bool = False  # attention reads the tree inputs: per-row positions and an ancestor mask (make_tree_inputs)


# ---- primitives ------------------------------------------------------------
def make_linear(b: GraphBuilder, x: str, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """``x @ weight.T (+ bias)`` as MatMul on a [in, out] initializer (what MatMulNBits quantizes)."""
    w = b.weight(f"{name}.weight", to_numpy(weight).T)
    path = node_path(name)
    (y,) = b.make_node("MatMul", [x, w], f"{path}/MatMul")
    if bias is not None:
        (y,) = b.make_node("Add", [y, b.weight(f"{name}.bias", to_numpy(bias))], f"{path}/Add")
    return y


def make_module_linear(b: GraphBuilder, x: str, name: str, module: nn.Linear) -> str:
    return make_linear(b, x, name, module.weight, module.bias)


def make_rms_norm(
    b: GraphBuilder, x: str, name: str, weight: torch.Tensor, eps: float, output: str | None = None
) -> str:
    """RMS norm with a learned scale; ``output`` names the result (e.g. a graph output)."""
    w = b.weight(f"{name}.weight", to_numpy(weight))
    (y,) = b.make_node(
        "SimplifiedLayerNormalization", [x, w], node_path(name) + "/SimplifiedLayerNorm",
        outputs=[output] if output else None, axis=-1, epsilon=float(eps), stash_type=1,
    )
    return y


def make_skip_rms_norm(
    b: GraphBuilder, x: str, skip: str, name: str, weight: torch.Tensor, eps: float, normed: str | None = None
) -> tuple[str, str]:
    """``(norm(x + skip), x + skip)`` in one fused op; ``normed`` names the first output (e.g. a graph output)."""
    w = b.weight(f"{name}.weight", to_numpy(weight))
    path = node_path(name) + "/SkipSimplifiedLayerNorm"
    normed = normed or f"{path}/output_0"
    b.make_node(
        "SkipSimplifiedLayerNormalization", [x, skip, w], path, domain=MS_DOMAIN,
        outputs=[normed, "", "", f"{path}/output_3"], epsilon=float(eps),
    )
    return normed, f"{path}/output_3"


def make_silu(b: GraphBuilder, x: str, path: str) -> str:
    (gate,) = b.make_node("Sigmoid", [x], f"{path}/Sigmoid")
    (y,) = b.make_node("Mul", [x, gate], f"{path}/Mul")
    return y


# ---- decoder layers ----------------------------------------------------------
def make_rotary_caches(b: GraphBuilder, rotary: nn.Module, head_dim: int, max_length: int) -> tuple[str, str]:
    """cos/sin caches [max_length, head_dim/2] taken from the model's own rotary module."""
    device = next(rotary.buffers()).device
    positions = torch.arange(max_length, device=device).unsqueeze(0)  # [1, max_length]
    probe = torch.zeros(1, max_length, head_dim, device=device)  # float32: caches computed in fp32
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # [1, max_length, head_dim] each (halves repeated)
    half = head_dim // 2
    return (
        b.weight("model.rotary_emb.cos_cache", to_numpy(cos[0, :, :half])),
        b.weight("model.rotary_emb.sin_cache", to_numpy(sin[0, :, :half])),
    )


def make_attention(
    b: GraphBuilder, x: str, index: int, attn: nn.Module, shape: AttentionShape, rotary: tuple[str, str]
) -> str:
    """Packed QKV projection + GroupQueryAttention (rotary inside, KV buffer shared past/present)."""
    name = f"model.layers.{index}.self_attn"
    projections = [attn.q_proj, attn.k_proj, attn.v_proj]
    weight = torch.cat([p.weight for p in projections], dim=0)  # [(nh + 2 kvh) * hd, H]
    biases = [p.bias for p in projections]
    bias = torch.cat(biases, dim=0) if all(t is not None for t in biases) else None
    if bias is None and any(t is not None for t in biases):
        raise ValueError(f"{name}: q/k/v biases must be all present or all absent")
    qkv = make_linear(b, x, f"{name}.qkv_proj", weight, bias)  # [1, S, (nh + 2 kvh) * hd]
    scale = float(getattr(attn, "scaling", shape.head_dim**-0.5))
    kv = (past_key(index), past_value(index), present_key(index), present_value(index))
    context = make_group_query_attention(b, qkv, kv, shape.num_heads, shape.kv_heads, scale, rotary,
                                         f"/model/layers.{index}/attn/GroupQueryAttention", shape.pad_row, shape.tree)
    return make_module_linear(b, context, f"{name}.o_proj", attn.o_proj)


def make_group_query_attention(
    b: GraphBuilder, qkv: str, kv: tuple[str, str, str, str], num_heads: int, kv_heads: int, scale: float,
    rotary: tuple[str, str], path: str, pad_row: bool = False, tree: bool = False,
) -> str:
    """GroupQueryAttention on packed QKV [1, S, (nh + 2 kvh) * hd] with rotary inside; ``kv`` names its
    (past_key, past_value, present_key, present_value), bound to one buffer each at run time. -> [1, S, nh * hd]

    ``pad_row``: the node runs S+1 query rows, the last a copy of row S-1 one position later,
    whose output is dropped. ONNX Runtime's CPU kernel rounds a one-row call differently from a
    multi-row one (docs/runtime.md, "Row invariance"); with the extra row a decode step and a
    verify pass take the same path. The copy's KV entry lands at position P+S, past what the
    call commits, so the caches need one row more than the context and the entry is never read.

    ``tree``: the node also reads the graph's tree inputs (:func:`make_tree_inputs`), so each row
    has its own rotary position and attends to the cache and its ancestors among the call's rows.
    """
    past_k, past_v, present_k, present_v = kv
    lengths = [SEQLENS_K, TOTAL_SEQUENCE_LENGTH]
    if pad_row:
        (qkv,) = b.make_node("Gather", [qkv, make_padded_rows(b, qkv)], f"{path}/pad/Gather", axis=1)
        lengths = make_padded_lengths(b)
    tree_inputs = make_tree_inputs(b, pad_row) if tree else []
    context, _, _ = b.make_node(
        "GroupQueryAttention", [qkv, "", "", past_k, past_v, *lengths, *rotary, *tree_inputs],
        path, domain=MS_DOMAIN, outputs=[f"{path}/output_0", present_k, present_v],
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0,
    )
    if pad_row:
        starts, ends, axes = (b.int64s(f"{path}/pad/{n}", [v]) for n, v in (("starts", 0), ("ends", -1), ("axes", 1)))
        (context,) = b.make_node("Slice", [context, starts, ends, axes], f"{path}/pad/Slice")
    return context


PADDED_LENGTHS = "/model/attention_pad"


def make_padded_lengths(b: GraphBuilder) -> list[str]:
    """``seqlens_k + 1`` and ``total_sequence_length + 1`` (once per graph): a call's lengths with its padding row."""
    seqlens, total = f"{PADDED_LENGTHS}/seqlens_k", f"{PADDED_LENGTHS}/total_sequence_length"
    if not any(node.name == seqlens for node in b.nodes):
        one, scalar_one = np.ones(1, dtype=np.int32), np.ones((), dtype=np.int32)
        b.make_node("Add", [SEQLENS_K, b.constant(f"{PADDED_LENGTHS}/one", one)], seqlens, outputs=[seqlens])
        b.make_node("Add", [TOTAL_SEQUENCE_LENGTH, b.constant(f"{PADDED_LENGTHS}/scalar_one", scalar_one)], total,
                    outputs=[total])
    return [seqlens, total]


def make_padded_rows(b: GraphBuilder, x: str) -> str:
    """Row indices ``0 .. S-1, S-1`` (int64 [S+1]) of ``x`` [1, S, ...] (once per graph: every layer's
    call has the same S): one Gather then appends the padding row, a copy of the last."""
    rows = f"{PADDED_LENGTHS}/rows"
    if not any(node.name == rows for node in b.nodes):
        (length,) = b.make_node("Shape", [x], f"{PADDED_LENGTHS}/rows/Shape", start=1, end=2)  # [1]: S
        (count,) = b.make_node("Squeeze", [length, b.int64s(f"{PADDED_LENGTHS}/rows/axes", [0])],
                               f"{PADDED_LENGTHS}/rows/Squeeze")
        scalar = np.array(0, dtype=np.int64), np.array(1, dtype=np.int64)
        (every,) = b.make_node("Range", [b.constant(f"{PADDED_LENGTHS}/rows/zero", scalar[0]), count,
                                         b.constant(f"{PADDED_LENGTHS}/rows/one", scalar[1])],
                               f"{PADDED_LENGTHS}/rows/Range")
        (last,) = b.make_node("Sub", [length, b.int64s(f"{PADDED_LENGTHS}/rows/last", [1])],
                              f"{PADDED_LENGTHS}/rows/Sub")
        b.make_node("Concat", [every, last], rows, outputs=[rows], axis=0)
    return rows


TREE_INPUTS = "/model/attention_tree"


def make_tree_inputs(b: GraphBuilder, pad_row: bool) -> list[str]:
    """GroupQueryAttention's ``position_ids`` and ``attention_bias`` from the graph's tree inputs (once per graph).

    ``tree_positions`` [1, S] and ``tree_bias`` [1, 1, S, S] describe the call's own rows. The
    kernel wants the bias over every key, [1, 1, S, P+S]: the P cached columns are zeros (every
    row sees the whole cache). With ``pad_row`` the padding row gets the last row's position + 1
    and the last row's mask plus itself: [1, S+1] and [1, 1, S+1, P+S+1]. The kernel's causal
    mask still applies on top, so a key row after the query row is never read whatever its bias.

    ONNX Runtime's CPU kernel ignores per-row positions in a call without a past (``P = 0``,
    its "first prompt"): it then uses ``position_ids[0] + row``, so a tree needs ``P >= 1``
    (the runtime checks it, ``spaf_edge.runtime.graphs.TreeInputs``).
    """
    positions, bias = f"{TREE_INPUTS}/position_ids", f"{TREE_INPUTS}/attention_bias"
    if any(node.name == bias for node in b.nodes):
        return [positions, bias]
    path = TREE_INPUTS
    rows, source = TREE_POSITIONS, TREE_BIAS
    if pad_row:
        last = make_last_rows(b, TREE_POSITIONS, b.int64s(f"{path}/one_row", [1]), f"{path}/last_position")
        (later,) = b.make_node("Add", [last, b.int64s(f"{path}/one", [1])], f"{path}/pad_position")
        (rows,) = b.make_node("Concat", [TREE_POSITIONS, later], f"{path}/positions_Concat", axis=1)
        # [1, 1, S, S] -> [1, 1, S, S+1] (a zero column the real rows never read: it is after them) and the
        # last row again as the padding row's: its ancestors, itself (the diagonal) and the new zero
        (wide,) = b.make_node("Pad", [TREE_BIAS, b.int64s(f"{path}/pad_column", [0, 0, 0, 0, 0, 0, 0, 1])],
                              f"{path}/pad_column/Pad")
        starts, ends, axes = (b.int64s(f"{path}/last_row/{n}", [v])
                              for n, v in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 2)))
        (last_row,) = b.make_node("Slice", [wide, starts, ends, axes], f"{path}/last_row/Slice")
        (source,) = b.make_node("Concat", [wide, last_row], f"{path}/bias_Concat", axis=2)
    b.make_node("Identity", [rows], positions, outputs=[positions])
    # P = total_sequence_length - S zero columns in front: pads [0, 0, 0, P, 0, 0, 0, 0]
    (total,) = b.make_node("Cast", [TOTAL_SEQUENCE_LENGTH], f"{path}/total_Cast", to=7)  # int64 []
    (count,) = b.make_node("Shape", [TREE_POSITIONS], f"{path}/Shape", start=1, end=2)  # [1]: S
    (past,) = b.make_node("Sub", [total, count], f"{path}/past")  # [1]
    (pads,) = b.make_node("Concat", [b.int64s(f"{path}/pads_before", [0, 0, 0]), past,
                                     b.int64s(f"{path}/pads_after", [0, 0, 0, 0])], f"{path}/pads", axis=0)
    b.make_node("Pad", [source, pads], bias, outputs=[bias])
    return [positions, bias]


def make_mlp(b: GraphBuilder, x: str, index: int, mlp: nn.Module) -> str:
    """SiLU-gated MLP with gate and up fused into one MatMul."""
    name = f"model.layers.{index}.mlp"
    inner = mlp.gate_proj.out_features
    weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # [2I, H]
    bias = None
    if mlp.gate_proj.bias is not None:
        bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias], dim=0)
    gate_up = make_linear(b, x, f"{name}.gate_up_proj", weight, bias)
    path = f"/model/layers.{index}/mlp"
    gate, up = b.make_node("Split", [gate_up, b.int64s(f"{path}/split_sizes", [inner, inner])], f"{path}/Split",
                           num_outputs=2, axis=-1)
    (act,) = b.make_node("Mul", [make_silu(b, gate, f"{path}/act"), up], f"{path}/gate_mul")
    return make_module_linear(b, act, f"{name}.down_proj", mlp.down_proj)


def make_decoder_layers(
    b: GraphBuilder,
    hidden: str,
    layers: Any,
    layer_ids: Iterable[int],
    eps: float,
    shape: AttentionShape,
    rotary: tuple[str, str],
    on_layer: Callable[[], None] | None = None,
    taps: dict[int, str | None] | None = None,
) -> tuple[str, str]:
    """Run ``layer_ids`` on ``hidden`` [1, S, H]. Returns ``(mlp_out, residual)`` of the last layer.

    The last residual add is left to the caller, which fuses it into the next norm
    (upper) or emits it as the cutoff state (lower). ``taps``: its keys name layer counts m
    (m in ``layer_ids``, not the first); each gets the name of the state after m layers, the
    residual sum that layer m's input norm computes anyway.
    """
    pending: tuple[str, str] | None = None
    for index in layer_ids:
        layer = layers[index]
        norm_name = f"model.layers.{index}.input_layernorm"
        if pending is None:
            normed, residual = make_rms_norm(b, hidden, norm_name, layer.input_layernorm.weight, eps), hidden
        else:
            normed, residual = make_skip_rms_norm(b, *pending, norm_name, layer.input_layernorm.weight, eps)
            if taps is not None and index in taps:
                taps[index] = residual
        attn = make_attention(b, normed, index, layer.self_attn, shape, rotary)
        normed, residual = make_skip_rms_norm(
            b, attn, residual, f"model.layers.{index}.post_attention_layernorm",
            layer.post_attention_layernorm.weight, eps,
        )
        pending = (make_mlp(b, normed, index, layer.mlp), residual)
        if on_layer is not None:
            on_layer()
    assert pending is not None, "a stack needs at least one layer"
    return pending


# ---- head ------------------------------------------------------------------
def make_last_rows(b: GraphBuilder, x: str, count: str, path: str) -> str:
    """The last ``count`` (int64 [1]) positions of ``x`` [1, S, H] -> [1, count, H]; ``count`` 0 gives no rows."""
    (length,) = b.make_node("Shape", [x], f"{path}/Shape", start=1, end=2)  # [1]: S
    (start,) = b.make_node("Sub", [length, count], f"{path}/Sub")
    ends, axes = b.int64s(f"{path}/ends", [np.iinfo(np.int64).max]), b.int64s(f"{path}/axes", [1])
    (rows,) = b.make_node("Slice", [x, start, ends, axes], f"{path}/Slice")
    return rows


@dataclass(frozen=True)
class QuantizedHead:
    """An LM head as one MatMulNBits node: weight names and quantization (spaf_edge.core.embedding_layout)."""

    packed: str  # uint8 [N, blocks, blob]
    scales: str  # [N * blocks], the export's float dtype
    bias: str | None
    hidden: int  # K
    bits: int
    block_size: int
    accuracy_level: int


HeadBlocks = list[tuple[str, str | None]]  # (weight [rows, H], bias) per consecutive row range


def make_lm_head(b: GraphBuilder, normed: str, path: str, head: HeadBlocks | QuantizedHead, vocab: int,
                 output: str) -> str:
    """Logits float32 [1, n, V] from normed states [1, n, H] and the head's float blocks or quantized rows.

    Gemm(transB=1) reads a [V, H] table in place: a tied embedding serves as LM head
    without a transposed copy. Several blocks (consecutive row ranges) give one Gemm each,
    concatenated along the vocabulary axis. A quantized head is one MatMulNBits node, whose
    weight layout is also row-major over the vocabulary.
    """
    hidden = head.hidden if isinstance(head, QuantizedHead) else b.weights[head[0][0]].shape[1]
    (flat,) = b.make_node("Reshape", [normed, b.int64s(f"{path}/flat_shape", [-1, hidden])], f"{path}/Reshape")
    if isinstance(head, QuantizedHead):
        (logits,) = b.make_node("MatMulNBits", [flat, head.packed, head.scales], f"{path}/MatMulNBits",
                                domain=MS_DOMAIN, K=hidden, N=vocab, bits=head.bits, block_size=head.block_size,
                                accuracy_level=head.accuracy_level)
        if head.bias:
            (logits,) = b.make_node("Add", [logits, head.bias], f"{path}/Add")
    else:
        pieces = []
        for index, (weight, bias) in enumerate(head):
            name = f"{path}/Gemm" if len(head) == 1 else f"{path}/Gemm_{index}"
            pieces += b.make_node("Gemm", [flat, weight] + ([bias] if bias else []), name, transB=1)
        logits = pieces[0] if len(pieces) == 1 else b.make_node("Concat", pieces, f"{path}/Concat", axis=1)[0]
    shape = b.int64s(f"{path}/logits_shape", [1, -1, vocab])
    if b.dtype == np.float32:
        b.make_node("Reshape", [logits, shape], f"{path}/Reshape_1", outputs=[output])
    else:
        (logits,) = b.make_node("Reshape", [logits, shape], f"{path}/Reshape_1")
        b.make_node("Cast", [logits], f"{path}/Cast", outputs=[output], to=1)  # float32
    return output
