"""The runtime is torch-free: it imports only numpy, onnxruntime, tokenizers, jinja2 and stdlib.

A subprocess loads an export, generates, streams and runs ``spaf-edge run``, then proves
that neither torch nor transformers was imported; a static scan of the runtime's
imports backs it up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import spaf_edge.decoding
import spaf_edge.runtime
from conftest import make_tiny_spaf, make_tiny_tokenizer
from spaf_edge.exporters import export_model

ALLOWED_PACKAGES = {"numpy", "onnxruntime", "tokenizers", "jinja2"}
ALLOWED_SPAF_MODULES = {  # torch-free modules of spaf_edge the runtime may use
    "spaf_edge.config", "spaf_edge.errors", "spaf_edge.io_names", "spaf_edge.manifest", "spaf_edge.sampling",
    "spaf_edge.stats", "spaf_edge.shared_weights", "spaf_edge.atomic", "spaf_edge.cache_length",
    "spaf_edge.embedding_layout",
}

SCRIPT = """
import sys
from spaf_edge.runtime import Engine

engine = Engine.from_folder(sys.argv[1])
result = engine.generate("Hi", max_new_tokens=6)
assert result.tokens and isinstance(result.text, str)
pieces = list(engine.stream("Hi", max_new_tokens=6, temperature=1.0, seed=1))
plain = engine.generate([5, 6, 7], max_new_tokens=4, mode="greedy")
assert len(plain.tokens) >= 1

from spaf_edge.cli import main
try:
    main(["run", sys.argv[1], "--prompt", "Hi", "--max-new-tokens", "4", "--stats"])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("LOADED:", sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    model = make_tiny_spaf("llama", hidden_size=64)
    model.tokenizer = make_tiny_tokenizer()
    return export_model(model, tmp_path_factory.mktemp("no_torch") / "export", progress=False)


def test_engine_and_run_command_never_import_torch(tiny_export):
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tiny_export)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED: []" in done.stdout, done.stdout[-2000:]


def test_runtime_modules_import_only_allowed_packages():
    """The runtime's and the decoding core's modules (the loop is shared with the PyTorch reference)."""
    stdlib = set(sys.stdlib_module_names)
    folders = [Path(spaf_edge.runtime.__file__).parent, Path(spaf_edge.decoding.__file__).parent]
    problems = []
    for path in sorted(path for folder in folders for path in folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = (top in stdlib or top in ALLOWED_PACKAGES or name in ALLOWED_SPAF_MODULES
                      or name.startswith(("spaf_edge.runtime", "spaf_edge.decoding")) or name == "__future__")
                if not ok:
                    problems.append(f"{path.name}: import {name}")
    assert not problems
