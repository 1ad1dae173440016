#!/usr/bin/env bash
# Reproduce models/smollm2-135m-instruct: the trained SpAF components shipped for the embedded
# default model (SmolLM2-135M-Instruct). See models/smollm2-135m-instruct/README.md.
#
# usage: scripts/train_default.sh [OUT_DIR] [TRAIN_PROMPTS]
# Takes ~85 min on 2 CPU cores (feature cache ~27 min, 2 x 1000 steps ~29 + 27 min at 590-645 tokens/s).
# The shipped run trained 1000 steps, was evaluated, then resumed to 2000 (the resumed part follows a
# 2000-step cosine schedule from step 1000 on); both phases are reproduced here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/default}
PROMPTS=${2:-../shared/data/train_prompts.jsonl}
SPAF=${SPAF:-.venv/bin/spaf-edge}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
# The committed corpus's first 208 base replies + the training prompts in a seeded order; train takes the
# first 3208 rows.
"$PYTHON" scripts/make_training_mix.py models/smollm2-135m-instruct/distilled_replies.jsonl.gz "$PROMPTS" \
  "$OUT/train_mix.jsonl" 0 208
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$SPAF" train --data "$OUT/train_mix.jsonl" --max-examples 3208 \
  --out "$OUT/run" --config configs/spaf_smollm2_fused.json --draft-vocab-size 4096 --steps 1000 \
  --batch-size 4 --seq-len 256 --lr 1e-3 --warmup 30 --eval-every 250 --save-every 100 \
  --feature-cache "$OUT/feature_cache"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$SPAF" train --out "$OUT/run" --resume --steps 2000
echo "trained components: $OUT/run/final"
