#!/usr/bin/env bash
# A separate venv for the optimum baseline: optimum-onnx 0.1.0 requires transformers < 4.58,
# which cannot share an environment with spaf-edge's transformers 5.x. spaf-edge need not be
# installed in it: `spaf-edge bench --baseline-python optimum=VENV/bin/python` puts this
# checkout on the worker's PYTHONPATH.
#
#   benchmarks/make_optimum_venv.sh [VENV_DIR]     # default /work/venv-optimum
set -euo pipefail
VENV=${1:-/work/venv-optimum}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0" "optimum-onnx[onnxruntime]==0.1.0"
"$VENV/bin/python" -c "import optimum.onnxruntime, transformers; print('optimum venv ready, transformers', transformers.__version__)"
