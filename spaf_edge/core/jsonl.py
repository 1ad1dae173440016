"""Reading JSONL files (one JSON object per line, plain or gzipped) with errors that name the file and line.

Torch-free.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spaf_edge.core.errors import ConfigError


def read_jsonl(path: str | os.PathLike, expected: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-empty line; ConfigError for a missing file, bad JSON
    or a line that is not an object (``expected`` adds what the object should hold).

    A name ending in ``.gz`` is read through gzip (the committed distilled corpus is stored so); a
    truncated or corrupt archive is a ConfigError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Data file not found: {path}. Pass an existing JSONL file.")
    try:
        yield from _rows(path, expected)
    except (OSError, EOFError, zlib.error) as exc:
        if path.suffix != ".gz":
            raise
        raise ConfigError(f"{path} is not a readable gzip file ({exc}); fetch or re-create it.") from exc


def _rows(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    opened = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")
    with opened as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number} is not valid JSON ({exc}); fix or remove that line.") from exc
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{path}:{number} must be a JSON object{expected}, got {type(row).__name__}."
                )
            yield number, row
