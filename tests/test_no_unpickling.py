"""No code path unpickles a file: the package source holds none of the calls that would."""

from __future__ import annotations

import re
from pathlib import Path

FORBIDDEN = re.compile(
    r"torch\.load\(|pickle\.loads?\(|import pickle|from pickle import|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
)


def test_package_source_never_unpickles():
    root = Path(__file__).resolve().parents[1] / "spaf_edge"
    assert (root / "core" / "sampling.py").is_file()
    found = [f"{path.relative_to(root.parent)}:{number}: {line.strip()}"
             for path in sorted(root.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert not found, "unpickling in the package:\n" + "\n".join(found)
