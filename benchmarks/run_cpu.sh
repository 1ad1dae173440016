#!/usr/bin/env bash
# Reproduce the CPU benchmark saved in benchmarks/results/cpu-smollm2-untrained/:
# SmolLM2-135M-Instruct (fp32) with untrained SpAF components, one MT-Bench prompt per
# category, 64 new tokens, 2 threads, every installed baseline.
#
#   benchmarks/run_cpu.sh                         # spaf-edge from PATH
#   SPAF_EDGE=/work/venv/bin/spaf-edge OPTIMUM_PYTHON=/work/venv-optimum/bin/python benchmarks/run_cpu.sh
#
# OPTIMUM_PYTHON: an interpreter of a venv with optimum-onnx (see benchmarks/make_optimum_venv.sh);
# without it the optimum baseline is skipped with a note. Extra arguments go to `spaf-edge bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
SPAF_EDGE=${SPAF_EDGE:-spaf-edge}
args=(
    bench --base-model default --per-category 1 --max-new-tokens 64
    --precision fp32 --provider cpu --threads "${THREADS:-2}"
    --name "${NAME:-cpu-smollm2-untrained}" --output-dir benchmarks/results
)
if [[ -n "${OPTIMUM_PYTHON:-}" ]]; then
    args+=(--baseline-python "optimum=${OPTIMUM_PYTHON}")
fi
exec "$SPAF_EDGE" "${args[@]}" "$@"
