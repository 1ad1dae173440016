"""Weight-only quantization with ONNX Runtime's own MatMulNBits quantizer.

Every MatMul weight, the decoder layers' and the SpAF modules', is quantized by
:func:`quantize_graph` (blockwise, symmetric, block 32): on the shipped components int4
SpAF modules draft as well as float32 ones (tau 1.73 vs 1.70 on 16 MT-Bench prompts). The
LM head and its draft-vocabulary rows are built as MatMulNBits nodes directly
(:func:`quantize_rows`, the same quantizer's kernel): a tied head shares its quantized bytes
with the embedding rows of ``embeddings.bin`` (:mod:`spaf_edge.core.embedding_layout`). Norms,
rotary caches and the attention adapter's own attention keep the export's float dtype.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from spaf_edge.core.embedding_layout import (
    BLOCK_SIZE,
    QUANTIZATION_BITS,
    EmbeddingLayout,
)

ACCURACY_LEVEL = 4  # MatMulNBits may compute with int8 activations where the CPU kernel supports it


def quantize_graph(model: onnx.ModelProto, quantization: str) -> onnx.ModelProto:
    """Replace every MatMul of ``model`` (decoder layers and SpAF modules) by MatMulNBits (``int8`` or ``int4``)."""
    if not any(node.op_type == "MatMul" for node in model.graph.node):
        return model
    quantizer_class = _import_quantizer()
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantizer = quantizer_class(model, bits=QUANTIZATION_BITS[quantization], block_size=BLOCK_SIZE,
                                    is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
        quantizer.process()
    finally:
        logger.setLevel(level)
    return quantizer.model.model


def _import_quantizer() -> type:
    """Import MatMulNBitsQuantizer without its import-time ``logging.basicConfig`` (root at INFO)."""
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)  # basicConfig does nothing while the root logger has a handler
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.removeHandler(guard)
    return MatMulNBitsQuantizer


def quantize_rows(table: np.ndarray, layout: EmbeddingLayout) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K]`` float rows -> (packed ``uint8 [N, blocks, blob]``, scales ``[N, blocks]`` in ``layout.dtype``).

    Rows are MatMulNBits' output columns: the node computes ``A @ rows.T``. Symmetric, so no zero points.
    """
    from onnxruntime.capi._pybind_state import (
        quantize_matmul_4bits,
        quantize_matmul_8bits,
    )

    rows, k = table.shape
    weight = np.zeros((layout.blocks * layout.block_size, rows), dtype=np.float32)  # [K padded, N]
    weight[:k] = table.astype(np.float32).T
    packed = np.zeros((rows, layout.blocks, layout.block_size * layout.bits // 8), dtype=np.uint8)
    scales = np.zeros((rows, layout.blocks), dtype=np.float32)
    zero_points = np.zeros((rows, -(-layout.blocks * layout.bits // 8)), dtype=np.uint8)  # unused: symmetric
    kernel = quantize_matmul_4bits if layout.bits == 4 else quantize_matmul_8bits
    kernel(packed, weight, scales, zero_points, layout.block_size, rows, weight.shape[0], True)
    return packed, scales.astype(layout.dtype)
