"""The torch-free on-device runtime: an export folder run with ONNX Runtime (docs/runtime.md).

Imports only numpy, onnxruntime, tokenizers and jinja2 (plus the torch-free parts of
spaf_edge); ``tests/test_no_torch.py`` proves it.
"""

from spaf_edge.decoding.loop import DecodeResult
from spaf_edge.runtime.engine import Engine, TextStream

__all__ = ["DecodeResult", "Engine", "TextStream"]
