"""Weight-only quantization with ONNX Runtime's own MatMulNBits quantizer.

Only the decoder layers' MatMul weights are quantized (blockwise, symmetric, block 32).
The shared tensors (embedding / tied LM head, final norm, draft head) and the small
SpAF modules keep the export's float dtype: the first are shared by several graphs and
read in place, the second are tiny and drive the acceptance rate.
"""

from __future__ import annotations

import logging

import onnx

QUANTIZATION_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits may compute with int8 activations where the CPU kernel supports it
LAYER_PREFIX = "/model/layers."


def quantize_graph(model: onnx.ModelProto, quantization: str) -> onnx.ModelProto:
    """Replace the decoder layers' MatMuls of ``model`` by MatMulNBits (``int8`` or ``int4``)."""
    quantizer_class = _import_quantizer()
    exclude = [node.name for node in model.graph.node
               if node.op_type == "MatMul" and not node.name.startswith(LAYER_PREFIX)]
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantizer = quantizer_class(
            model, bits=QUANTIZATION_BITS[quantization], block_size=BLOCK_SIZE, is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=exclude,
        )
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
