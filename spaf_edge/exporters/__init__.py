"""ONNX export of SpAF models (needs torch + onnx; the runtime never imports this package)."""

from spaf_edge.exporters.export import export_model

__all__ = ["export_model"]
