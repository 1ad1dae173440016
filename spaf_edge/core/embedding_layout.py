"""The byte layout of ``embeddings.bin``: raw rows, or blockwise-quantized rows. Torch-free.

A float export stores the ``[V, H]`` table raw, row-major. An int4/int8 export stores it
in the layout of ONNX Runtime's ``MatMulNBits`` weights, so that the tied LM head in
``upper.onnx`` reads the same bytes (its initializers point into the file) and the
table is on disk once, quantized:

- ``[0, V * row_bytes)``: packed rows ``uint8 [V, blocks, block_size * bits / 8]``; a
  4-bit block packs element ``2i`` in the low nibble of byte ``i`` and ``2i+1`` in the high one;
- from ``scales_offset`` (the next page): scales ``[V, blocks]`` in the export dtype.

Quantization is symmetric, so there are no zero points: an element is
``(q - 2 ** (bits - 1)) * scale`` (MatMulNBits' default zero point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTIZATION_BITS = {"int8": 8, "int4": 4}  # weight-only quantizations of an export and their bit widths
BLOCK_SIZE = 32  # elements per quantization block along the hidden axis
PAGE = 4096  # the scales start on a page boundary (ONNX Runtime may map them)


@dataclass(frozen=True)
class EmbeddingLayout:
    vocab_size: int  # V
    hidden_size: int  # H
    dtype: np.dtype  # the float dtype of dequantized rows and of the scales
    bits: int | None = None  # None: raw rows; 4 or 8: quantized blocks
    block_size: int = BLOCK_SIZE

    @classmethod
    def for_export(cls, vocab_size: int, hidden_size: int, dtype: str, quantization: str | None) -> EmbeddingLayout:
        """The layout of an export with ``dtype`` (``float32``/``float16``) and ``quantization`` (None/int8/int4)."""
        bits = QUANTIZATION_BITS[quantization] if quantization else None
        return cls(vocab_size, hidden_size, np.dtype(dtype), bits)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def blocks(self) -> int:
        return -(-self.hidden_size // self.block_size)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's row: its values (raw) or its packed blocks (quantized)."""
        if not self.quantized:
            return self.hidden_size * self.dtype.itemsize
        return self.blocks * self.block_size * self.bits // 8

    @property
    def scale_bytes(self) -> int:
        """Bytes of one token's scales (none for raw rows)."""
        return self.blocks * self.dtype.itemsize if self.quantized else 0

    @property
    def scales_offset(self) -> int:
        return -(-self.vocab_size * self.row_bytes // PAGE) * PAGE if self.quantized else 0

    @property
    def file_size(self) -> int:
        if not self.quantized:
            return self.vocab_size * self.row_bytes
        return self.scales_offset + self.vocab_size * self.scale_bytes

    def dequantize(self, packed: np.ndarray, scales: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows from packed bytes ``uint8 [n, row_bytes]`` and ``scales [n, blocks]`` into ``out`` [n, H].

        Each byte indexes a table of the float value(s) it packs (exact small integers), so a
        row takes three array operations whatever its width.
        """
        n = len(packed)
        values = _BYTE_VALUES[self.bits][packed]  # float32 [n, row_bytes, 2] (4 bits) or [n, row_bytes] (8 bits)
        blocks = values.reshape(n, self.blocks, self.block_size)
        blocks *= scales.astype(np.float32, copy=False)[:, :, None]
        out[:] = blocks.reshape(n, -1)[:, : self.hidden_size]
        return out


def _byte_values() -> dict[int, np.ndarray]:
    """Per bit width, the float32 element value(s) of each byte: 4 bits -> [256, 2] (low nibble, high
    nibble), 8 bits -> [256]; the zero point ``2 ** (bits - 1)`` subtracted."""
    byte = np.arange(256)
    return {
        4: np.stack([(byte & 0x0F) - 8, (byte >> 4) - 8], axis=-1).astype(np.float32),
        8: (byte - 128).astype(np.float32),
    }


_BYTE_VALUES = _byte_values()
