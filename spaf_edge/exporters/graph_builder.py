"""A small ONNX graph builder: ``make_*`` calls with computed, deterministic names.

Node names follow the module path they implement (``/model/layers.3/attn/qkv_proj/MatMul``)
and every output is ``{node name}/output_{i}``, so nothing is tracked by hand. Weights
are kept as numpy arrays until the graph is serialised, which lets the exporter decide
afterwards which of them several graphs share (those are stored once, see
:mod:`spaf_edge.exporters.writer`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"

NUMPY_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,  # quantized weights (MatMulNBits)
}


def onnx_dtype(dtype: np.dtype | str) -> int:
    return NUMPY_TO_ONNX[np.dtype(dtype)]


def node_path(module_name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``/model/layers.3/mlp/down_proj`` (node name prefix)."""
    return "/" + re.sub(r"\.(?!\d)", "/", module_name)


@dataclass
class GraphBuilder:
    """Collects nodes, weights and IO of one graph. ``dtype`` is the float type of weights/activations."""

    name: str
    dtype: np.dtype
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # candidates for sharing across graphs
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # small per-graph tensors (shapes, caches)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)

    # ---- tensors -------------------------------------------------------
    def weight(self, name: str, array: np.ndarray, packed: bool = False) -> str:
        """Register a float weight (cast to the graph dtype), or ``packed`` bytes as they are. Returns its name."""
        array = np.ascontiguousarray(array, dtype=None if packed else self.dtype)
        known = self.weights.get(name)
        differs = known is not None and known is not array
        if differs and (known.shape != array.shape or not np.array_equal(known, array)):
            raise ValueError(f"weight {name} registered twice with different values")
        self.weights[name] = array
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        """Register a small graph-private tensor (shape vectors, rotary caches). Returns its name."""
        self.constants[name] = np.ascontiguousarray(array)
        return name

    def int64s(self, name: str, values: Sequence[int]) -> str:
        return self.constant(name, np.asarray(values, dtype=np.int64))

    # ---- IO ------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    @property
    def float_type(self) -> int:
        return onnx_dtype(self.dtype)

    # ---- nodes ---------------------------------------------------------
    def make_node(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        num_outputs: int = 1,
        outputs: Sequence[str] | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        """Append a node; its outputs are ``{name}/output_{i}`` unless ``outputs`` names them."""
        if outputs is None:
            outputs = [f"{name}/output_{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain, **attrs))
        return list(outputs)

    def make_model(self, external: dict[str, TensorProto], overridable: set[str]) -> onnx.ModelProto:
        """Serialise: weights named in ``external`` as given (external references), the rest inline.

        Weights in ``overridable`` (the ones several graphs share) are also declared as graph
        inputs, which makes them *overridable* initializers: ONNX Runtime then neither
        prepacks nor constant-folds them, so a buffer handed in with
        ``SessionOptions.add_initializer`` is used as is, once for every session
        (docs/exporter.md, "Shared weights").
        """
        initializers = []
        inputs = list(self.inputs)
        for name, array in self.weights.items():
            initializers.append(external[name] if name in external else numpy_helper.from_array(array, name))
            if name in overridable:
                inputs.append(helper.make_tensor_value_info(name, onnx_dtype(array.dtype), list(array.shape)))
        initializers += [numpy_helper.from_array(array, name) for name, array in self.constants.items()]
        graph = helper.make_graph(self.nodes, self.name, inputs, self.outputs, initializer=initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="spaf-edge",
        )
        model.ir_version = IR_VERSION
        return model
