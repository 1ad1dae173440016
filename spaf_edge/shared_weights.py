"""Weights used by several graphs of an export, stored once and loaded once.

``shared_weights.bin`` holds the tensors (untied LM head, final norm, rotary caches) that
more than one graph uses; a tied LM head shared by two graphs stays in ``embeddings.bin``,
where the embedding rows are. ``shared_weights.json`` indexes them with their files. Each
graph references them as ONNX external data *and* lists them as graph inputs, which makes
them overridable initializers: ONNX Runtime then does not prepack or constant-fold them.
The runtime maps each file once and hands the same OrtValues to every session with
``SessionOptions.add_initializer``, so no session loads its own copy (measured:
docs/exporter.md). Torch-free: numpy + onnxruntime only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spaf_edge.errors import ExportFormatError
from spaf_edge.io_names import SHARED_WEIGHTS_INDEX

INDEX_VERSION = 2  # 2: each tensor names its file
ALIGNMENT = 4096  # offsets in the .bin are page-aligned (mappable, SIMD-aligned)


@dataclass(frozen=True)
class SharedTensor:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]
    file: str  # the folder's file holding it (shared_weights.bin or embeddings.bin)
    offset: int  # bytes into that file
    nbytes: int
    graphs: tuple[str, ...]  # graph files that use it

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "file": self.file, "offset": self.offset,
                "nbytes": self.nbytes, "graphs": list(self.graphs)}


def write_index(path: str | Path, tensors: list[SharedTensor]) -> None:
    data = {"format_version": INDEX_VERSION, "tensors": {t.name: t.to_dict() for t in tensors}}
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
            SharedTensor(name, t["dtype"], tuple(t["shape"]), _plain_name(t["file"]), int(t["offset"]),
                         int(t["nbytes"]), tuple(t["graphs"]))
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

    ``mmap=True`` (default) maps each file read-only (an ``np.memmap``; the OrtValues view it,
    no copy): pages load on first use and stay shared with the OS page cache. The OS maps
    whole page-cache folios, so reading a few rows can make megabytes resident (about 2 MB
    per touched row on Linux with file THP; docs/exporter.md): a shared head is read whole
    anyway, and no graph gathers embedding rows (the runtime reads them). The OrtValues live in CPU
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
        blobs: dict[str, np.ndarray] = {}  # one mapping per file
        for tensor in self.tensors.values():
            blob = blobs.get(tensor.file)
            if blob is None:
                blob = blobs[tensor.file] = _load(folder / tensor.file, mmap)
            if tensor.offset + tensor.nbytes > blob.size:
                raise ExportFormatError(
                    f"{folder / tensor.file} is truncated ({tensor.name} ends past its end). Re-run export."
                )
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

        from spaf_edge.runtime.session import compatible_session_options

        if options is None:
            options = compatible_session_options()
            options.log_severity_level = 3  # ORT warns about overridable initializers, which are by design here
        self.add_to(options, graph)
        session = ort.InferenceSession(str(self.folder / graph), options, providers=list(providers), **kwargs)
        session.spaf_shared_weights = self  # ties the buffers' lifetime to the session's
        return session

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _load(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise ExportFormatError(f"{path} is missing but {SHARED_WEIGHTS_INDEX} lists tensors in it. Re-run export.")
    return np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)


def _plain_name(name: str) -> str:
    """A file name inside the export folder (the index must not point elsewhere)."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"file {name!r} is not a file name inside the export folder")
    return name
