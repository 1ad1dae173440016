#!/usr/bin/env bash
# Pack what scripts/gpu_bench.sh needs on an offline GPU machine into carry folders.
#
#   scripts/gpu_bench_pack.sh [DEST]     # default: .gpu_bench (git-ignored)
#
# Downloads from PyPI the Python 3.12 manylinux wheels of onnxruntime-gpu (CUDA 13 build),
# onnxruntime-genai-cuda, onnx and their small dependencies, adds the embedded GGUF, and splits
# the lot (one tar) into DEST/carry_1, DEST/carry_2, ... of PART_MB (default 56) MiB each: the
# device tool carries at most 64 MiB per call, and a warm machine keeps /tmp between calls.
# Each carry call copies its part to /tmp/bundle; the last call runs scripts/gpu_bench.sh
# /tmp/bundle (docs/benchmarks.md, "CUDA").
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$REPO/.gpu_bench}
PYTHON=${PYTHON:-python3}
PART_MB=${PART_MB:-56}
WHEELS=(onnxruntime-gpu==1.31.1 onnxruntime-genai-cuda==0.18.0 onnx protobuf flatbuffers ml_dtypes gguf)

rm -rf "$DEST"
mkdir -p "$DEST/files"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST/files" "${WHEELS[@]}"
GGUF=$(cd "$REPO" && "$PYTHON" -c "from spaf_edge.models.loading import default_gguf_path; print(default_gguf_path())")
cp "$GGUF" "$DEST/files/"
(cd "$DEST/files" && sha256sum -- * > SHA256SUMS)
tar -C "$DEST" -cf "$DEST/bundle.tar" files
split -b "${PART_MB}m" -d -a 2 "$DEST/bundle.tar" "$DEST/bundle.tar.part_"
index=0
for part in "$DEST"/bundle.tar.part_*; do
    index=$((index + 1))
    mkdir -p "$DEST/carry_$index"
    mv "$part" "$DEST/carry_$index/"
done
rm -rf "$DEST/files" "$DEST/bundle.tar"
du -sh "$DEST"/carry_*
echo "$index carry folders in $DEST"
