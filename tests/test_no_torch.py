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
from conftest import make_tiny_spaf, make_tiny_tokenizer

import spaf_edge.core
import spaf_edge.decoding
import spaf_edge.runtime
from spaf_edge.exporters import export_model

ALLOWED_PACKAGES = {"numpy", "onnxruntime", "tokenizers", "jinja2", "tqdm", "psutil"}  # psutil: optional, with a fallback
ALLOWED_SPAF_ROOMS = ("spaf_edge.core", "spaf_edge.decoding", "spaf_edge.runtime")  # the torch-free modules

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
    """The runtime's, the decoding core's (shared with the PyTorch reference) and the core room's modules."""
    stdlib = set(sys.stdlib_module_names)
    folders = [Path(module.__file__).parent for module in (spaf_edge.core, spaf_edge.decoding, spaf_edge.runtime)]
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
                ok = (top in stdlib or top in ALLOWED_PACKAGES or name.startswith(ALLOWED_SPAF_ROOMS)
                      or name == "__future__")
                if not ok:
                    problems.append(f"{path.name}: import {name}")
    assert not problems
