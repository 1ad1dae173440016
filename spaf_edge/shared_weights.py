"""Weights used by several graphs of an export, stored once and loaded once.

``shared_weights.bin`` holds the tensors (embedding / tied LM head, untied LM head, final
norm, rotary caches) that more than one graph uses; ``shared_weights.json``
indexes them. Each graph references them as ONNX external data *and* lists them as
graph inputs, which makes them overridable initializers: ONNX Runtime then does not
prepack or constant-fold them. The runtime maps the file once and hands the same
OrtValues to every session with ``SessionOptions.add_initializer``, so no session loads
its own copy (measured: docs/exporter.md). Torch-free: numpy + onnxruntime only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spaf_edge.errors import ExportFormatError
from spaf_edge.io_names import SHARED_WEIGHTS, SHARED_WEIGHTS_INDEX

INDEX_VERSION = 1
ALIGNMENT = 4096  # offsets in the .bin are page-aligned (mappable, SIMD-aligned)


@dataclass(frozen=True)
class SharedTensor:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # bytes into shared_weights.bin
    nbytes: int
    graphs: tuple[str, ...]  # graph files that use it

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "offset": self.offset, "nbytes": self.nbytes,
                "graphs": list(self.graphs)}


def write_index(path: str | Path, tensors: list[SharedTensor]) -> None:
    data = {"format_version": INDEX_VERSION, "file": SHARED_WEIGHTS,
            "tensors": {t.name: t.to_dict() for t in tensors}}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def read_index(folder: str | Path) -> list[SharedTensor]:
    """The shared tensors of an export folder (empty when it has no shared weights)."""
    path = Path(folder) / SHARED_WEIGHTS_INDEX
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != INDEX_VERSION:
            raise ValueError(f"unknown index version {data.get('format_version')!r}")
        return [
            SharedTensor(name, t["dtype"], tuple(t["shape"]), int(t["offset"]), int(t["nbytes"]), tuple(t["graphs"]))
            for name, t in data["tensors"].items()
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportFormatError(f"{path} is malformed ({exc}). Re-run `spaf-edge export`.") from exc


class SharedWeights:
    """The shared tensors of one export folder, mapped once, as OrtValues for every session.

    Usage (one instance per engine)::

        shared = SharedWeights(folder)
        session = shared.open_session("upper.onnx", options, providers=[...])

    ONNX Runtime does not own buffers given with ``add_initializer``: the instance must
    outlive every session using them (a freed one crashes the process). ``open_session``
    pins it to the session; with :meth:`add_to` that is the caller's job.

    ``mmap=True`` (default) maps the file read-only (an ``np.memmap``; the OrtValues view it,
    no copy): pages load on first use and stay shared with the OS page cache. The OS maps
    whole page-cache folios, so reading a few rows can make megabytes resident (about 2 MB
    per touched row on Linux with file THP; docs/exporter.md). The OrtValues live in CPU
    memory; an execution provider on another device copies what it needs when the session
    is created.
    """

    def __init__(self, folder: str | Path, mmap: bool = True) -> None:
        import onnxruntime as ort

        self.folder = folder = Path(folder)
        self.tensors = {t.name: t for t in read_index(folder)}
        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, Any] = {}
        if not self.tensors:
            return
        path = folder / SHARED_WEIGHTS
        if not path.is_file():
            raise ExportFormatError(f"{path} is missing but {SHARED_WEIGHTS_INDEX} lists tensors. Re-run export.")
        size = path.stat().st_size
        blob = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
        for tensor in self.tensors.values():
            if tensor.offset + tensor.nbytes > size:
                raise ExportFormatError(f"{path} is truncated ({tensor.name} ends past its end). Re-run export.")
            raw = blob[tensor.offset : tensor.offset + tensor.nbytes]
            array = raw.view(np.dtype(tensor.dtype)).reshape(tensor.shape)
            self.arrays[tensor.name] = array
            self.values[tensor.name] = ort.OrtValue.ortvalue_from_numpy(array)

    def names_for(self, graph: str) -> list[str]:
        return [name for name, tensor in self.tensors.items() if graph in tensor.graphs]

    def add_to(self, options: Any, graph: str) -> Any:
        """Give ``options`` (an ``onnxruntime.SessionOptions``) the shared OrtValues ``graph`` uses."""
        for name in self.names_for(graph):
            options.add_initializer(name, self.values[name])
        return options

    def open_session(
        self, graph: str, options: Any = None, providers: Sequence[Any] = ("CPUExecutionProvider",),
        **kwargs: Any,
    ) -> Any:
        """An ``onnxruntime.InferenceSession`` of ``folder/graph`` on the shared buffers (kept alive by it)."""
        import onnxruntime as ort

        if options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # ORT warns about overridable initializers, which are by design here
        self.add_to(options, graph)
        session = ort.InferenceSession(str(self.folder / graph), options, providers=list(providers), **kwargs)
        session.spaf_shared_weights = self  # ties the buffers' lifetime to the session's
        return session

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
