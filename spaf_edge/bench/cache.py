"""Cached model builds for baselines and exports, keyed by what they are built from.

A build lands in ``<spaf-edge cache>/<kind>/<model name>-<key>`` through an atomic
folder, so an interrupted build never looks complete. The key hashes the source
folder's files (name, size, mtime), the settings and the versions of the tools that
build it, so a changed model or tool gives a new folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from spaf_edge.core.atomic import atomic_directory, build_once
from spaf_edge.models.loading import cache_dir

DONE_MARKER = "spaf_build.json"


def source_key(*sources: str | Path | None, **settings: Any) -> str:
    """A short hash of source folders/files (their file names, sizes, mtimes) and settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for source in sources:
        if source is None:
            continue
        path = Path(source).resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cached_folder(
    kind: str, source: str | Path, precision: str, build: Callable[[Path], None], **settings: Any
) -> Path:
    """Return the cached build of ``source``; run ``build(tmp_folder)`` first when there is none."""
    key = source_key(source, precision=precision, kind=kind, **settings)
    target = cache_dir() / kind / f"{Path(source).name}-{precision}-{key}"

    def build_folder() -> None:
        with atomic_directory(target) as tmp:
            build(tmp)
            record = {"source": str(source), "precision": precision, **settings}
            (tmp / DONE_MARKER).write_text(json.dumps(record, default=str))

    return build_once(target, (target / DONE_MARKER).is_file, build_folder)
