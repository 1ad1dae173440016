"""Reading JSONL files (one JSON object per line) with errors that name the file and line. Torch-free."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spaf_edge.core.errors import ConfigError


def read_jsonl(path: str | os.PathLike, expected: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-empty line; ConfigError for a missing file, bad JSON
    or a line that is not an object (``expected`` adds what the object should hold)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Data file not found: {path}. Pass an existing JSONL file.")
    with path.open(encoding="utf-8") as handle:
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
