"""A SpAF export to benchmark when none is given: exported once, cached by its sources.

The cache key covers the base folder, the SpAF checkpoint, precision, weight
quantization, max length and the exporter's own source code, so a changed exporter
re-exports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from spaf_edge.bench.cache import cached_folder, source_key

EXPORT_SUBDIR = "spaf"
DTYPES = {"fp32": "float32", "fp16": "float16"}


def cached_export(
    base_model: str | Path, components: str | Path | None, precision: str, max_length: int,
    quantization: str | None = None,
) -> Path:
    """Export ``base_model`` + ``components`` (untrained modules when None) once; return the folder.

    ``quantization``: None | int8 | int4, the exporter's weight-only quantization.

    ``max_length`` (KV rows) is capped at the base's context (``max_position_embeddings``).
    """
    context = json.loads((Path(base_model) / "config.json").read_text()).get("max_position_embeddings")
    max_length = min(max_length, int(context)) if context else max_length

    def build(tmp: Path) -> None:
        from spaf_edge.exporters import export_model
        from spaf_edge.model import SpAFModel

        model = SpAFModel.from_pretrained(base_model, components=components)
        export_model(
            model, tmp / EXPORT_SUBDIR, dtype=DTYPES[precision], quantization=quantization, max_length=max_length
        )

    folder = cached_folder(
        "exports", base_model, precision if quantization is None else f"{precision}-{quantization}", build,
        max_length=max_length,
        components=source_key(components) if components else None, exporter=exporter_code_key(),
    )
    return folder / EXPORT_SUBDIR


def exporter_code_key() -> str:
    """Hash of the exporter and model sources: a code change invalidates cached exports."""
    digest = hashlib.sha256()
    for file in exporter_sources():
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def exporter_sources() -> list[Path]:
    """The sources an export depends on: the exporters, the modules and architectures, and core/ (the
    manifest, IO names and byte layouts the exporter writes)."""
    root = Path(__file__).resolve().parents[1]
    folders = ("exporters", "modules", "models", "core")
    return [file for folder in folders for file in sorted((root / folder).rglob("*.py"))] + [root / "model.py"]
