"""``spaf-edge info``: what a SpAF checkpoint or export folder contains."""

from __future__ import annotations

import json
from pathlib import Path

import click

from spaf_edge.core.errors import ModelNotFoundError


@click.command("info")
@click.argument("path", type=click.Path())
def command(path):
    """Describe a SpAF checkpoint folder (from `train`) or an export folder (from `export`)."""
    click.echo(json.dumps(describe(Path(path)), indent=2))


def describe(path: Path) -> dict:
    from spaf_edge.core.io_names import MANIFEST

    if (path / MANIFEST).is_file():
        from spaf_edge.core.manifest import Manifest

        manifest = Manifest.load(path)
        sizes = {name: (path / name).stat().st_size for name in manifest.files}
        return {"kind": "export", **manifest.to_dict(), "file_bytes": sizes}
    from spaf_edge.model import META_FILE, read_component_meta

    if (path / META_FILE).is_file():
        from spaf_edge.core.config import SpAFConfig

        meta = read_component_meta(path)
        return {"kind": "checkpoint", **meta, "config": SpAFConfig.load(path).to_dict()}
    raise ModelNotFoundError(
        f"{path} is neither a SpAF checkpoint (no spaf_meta.json) nor an export folder (no manifest.json)."
    )
