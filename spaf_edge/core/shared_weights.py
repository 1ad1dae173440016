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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spaf_edge.core.errors import ExportFormatError
from spaf_edge.core.io_names import GRAPHS, SHARED_WEIGHTS_INDEX
from spaf_edge.core.manifest import is_plain_file_name

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
    """The shared tensors of an export folder (empty when it has no shared weights), each checked.

    Types, dtypes, shapes against byte counts, file names inside the folder and byte ranges
    inside their files' actual sizes: ExportFormatError naming the tensor and field otherwise.
    """
    folder = Path(folder)
    path = folder / SHARED_WEIGHTS_INDEX
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ExportFormatError(f"{path} is corrupt ({exc}). Re-run `spaf-edge export`.") from exc
    if not isinstance(data, dict) or data.get("format_version") != INDEX_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise ExportFormatError(
            f"{path} has unknown index version {version!r}; this spaf-edge reads version {INDEX_VERSION}. "
            "Re-run `spaf-edge export`."
        )
    tensors = data.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(t, dict) for t in tensors.values()):
        raise ExportFormatError(f"{path} is malformed: 'tensors' must map names to objects. Re-run `spaf-edge export`.")
    problems = [problem for name, entry in tensors.items() for problem in _entry_problems(folder, name, entry)]
    if problems:
        raise ExportFormatError(f"{path} is malformed: {'; '.join(problems)}. Re-run `spaf-edge export`.")
    return [
        SharedTensor(name, t["dtype"], tuple(t["shape"]), t["file"], t["offset"], t["nbytes"], tuple(t["graphs"]))
        for name, t in tensors.items()
    ]


def _entry_problems(folder: Path, name: str, entry: dict[str, Any]) -> list[str]:
    """What is wrong with one tensor entry of the index (empty when it is sound)."""
    fields = ("dtype", "shape", "file", "offset", "nbytes", "graphs")
    wrong = sorted(set(entry) ^ set(fields))
    if wrong:
        return [f"{name}: fields {wrong} are missing or unknown (expected {list(fields)})"]
    problems = []
    try:
        dtype = np.dtype(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "fiub":
        problems.append(f"{name}: dtype {entry['dtype']!r} is not a numeric numpy dtype name")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        problems.append(f"{name}: shape {shape!r} must be a list of integers >= 0")
    for key in ("offset", "nbytes"):
        if not _is_count(entry[key]):
            problems.append(f"{name}: {key} {entry[key]!r} must be an integer >= 0")
    if not is_plain_file_name(entry["file"]):
        problems.append(f"{name}: file {entry['file']!r} is not a file name inside the export folder")
    graphs = entry["graphs"]
    if not (isinstance(graphs, list) and graphs and all(isinstance(g, str) and g in GRAPHS for g in graphs)):
        problems.append(f"{name}: graphs {graphs!r} must be a non-empty list of {list(GRAPHS)}")
    if problems:
        return problems
    expected = math.prod(shape) * dtype.itemsize
    if entry["nbytes"] != expected:
        return [f"{name}: nbytes {entry['nbytes']} differs from shape {shape} x {dtype.name} = {expected} bytes"]
    file = folder / entry["file"]
    if not file.is_file():
        return [f"{name}: its file {entry['file']} is missing"]
    end, size = entry["offset"] + entry["nbytes"], file.stat().st_size
    if end > size:
        return [f"{name}: bytes {entry['offset']}..{end} lie past the end of {entry['file']} ({size} bytes; "
                "the file is truncated)"]
    return []


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SharedWeights:
    """The shared tensors of one export folder, mapped once, as OrtValues for every session.

    Usage (one instance per engine)::

        shared = SharedWeights(folder)
        session = open_shared_session(shared, "upper.onnx")  # spaf_edge.runtime.session

    ONNX Runtime does not own buffers given with ``add_initializer``: the instance must
    outlive every session using them (a freed one crashes the process).
    :func:`spaf_edge.runtime.session.open_shared_session` pins it to the session; with
    :meth:`add_to` alone that is the caller's job.

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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _load(path: Path, mmap: bool) -> np.ndarray:
    return np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
