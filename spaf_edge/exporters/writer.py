"""Serialise built graphs: shared weights once, private weights as per-graph external data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto

from spaf_edge.core.io_names import SHARED_WEIGHTS, SHARED_WEIGHTS_INDEX
from spaf_edge.core.shared_weights import ALIGNMENT, SharedTensor, write_index
from spaf_edge.exporters.graph_builder import GraphBuilder, onnx_dtype

INLINE_LIMIT = 1024  # bytes: smaller initializers stay inside the .onnx file


def find_shared(builders: dict[str, GraphBuilder]) -> dict[str, list[str]]:
    """Weight name -> graph files using it, for weights that more than one graph uses."""
    users: dict[str, list[str]] = {}
    for file_name, builder in builders.items():
        for name in builder.weights:
            users.setdefault(name, []).append(file_name)
    return {name: files for name, files in users.items() if len(files) > 1}


def write_shared_weights(
    folder: Path, builders: dict[str, GraphBuilder], placed: dict[str, tuple[str, int]]
) -> dict[str, TensorProto]:
    """Index the shared weights (writing ``shared_weights.bin`` for those not ``placed`` in
    another file already); return their external references for the graphs."""
    shared = find_shared(builders)
    if not shared:
        return {}
    references: dict[str, TensorProto] = {}
    index: list[SharedTensor] = []
    with open(folder / SHARED_WEIGHTS, "wb") as handle:
        for name, files in shared.items():
            array = builders[files[0]].weights[name]
            location, offset = placed.get(name) or (SHARED_WEIGHTS, _append_aligned(handle, array.tobytes()))
            index.append(SharedTensor(name, array.dtype.name, tuple(array.shape), location, offset, array.nbytes,
                                      tuple(files)))
            references[name] = _external_tensor(name, array, location, offset)
    write_index(folder / SHARED_WEIGHTS_INDEX, index)
    return references


def save_graph(model: onnx.ModelProto, folder: Path, file_name: str) -> list[str]:
    """Write ``file_name`` with its large private initializers in ``file_name.data``.

    Tensors already external (the shared ones) are left as they are. Offsets are
    page-aligned so ONNX Runtime can map the data. Returns the files written.
    """
    data_name = f"{file_name}.data"
    written = [file_name]
    with open(folder / data_name, "wb") as handle:
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL or len(tensor.raw_data) < INLINE_LIMIT:
                continue
            raw = tensor.raw_data
            offset = _append_aligned(handle, raw)
            tensor.ClearField("raw_data")
            _set_external(tensor, data_name, offset, len(raw))
        has_data = handle.tell() > 0
    if has_data:
        written.append(data_name)
    else:
        (folder / data_name).unlink()
    (folder / file_name).write_bytes(model.SerializeToString())
    return written


def write_graphs(
    folder: Path,
    builders: dict[str, GraphBuilder],
    transform: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
    placed: dict[str, tuple[str, int]] | None = None,
) -> list[str]:
    """Write every graph (after ``transform``, e.g. quantization) and the shared weights. Returns files.

    ``placed``: weight name -> (file, offset) of weights whose bytes the caller already wrote
    to a file of ``folder`` (the embedding rows in ``embeddings.bin``); graphs reference them
    there instead of storing a copy.
    """
    placed = placed or {}
    shared = write_shared_weights(folder, builders, placed)
    files = [SHARED_WEIGHTS, SHARED_WEIGHTS_INDEX] if shared else []
    for file_name, builder in builders.items():
        external = {name: _external_tensor(name, builder.weights[name], *placed[name])
                    for name in builder.weights if name in placed}
        model = builder.make_model({**external, **shared}, set(shared))
        if transform is not None:
            model = transform(model)
        files += save_graph(model, folder, file_name)
    return files


def _append_aligned(handle: BinaryIO, data: bytes) -> int:
    offset = handle.tell()
    pad = -offset % ALIGNMENT
    handle.write(b"\0" * pad)
    handle.write(data)
    return offset + pad


def _external_tensor(name: str, array: np.ndarray, location: str, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=onnx_dtype(array.dtype), dims=list(array.shape))
    _set_external(tensor, location, offset, array.nbytes)
    return tensor


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
