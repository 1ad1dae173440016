#!/usr/bin/env bash
# Data-parallel SpAF training on one machine with N GPUs (or N CPU processes on a CPU-only host).
# Every process loads the frozen base once; only the SpAF modules are synchronised.
#
#   scripts/launch/single_node.sh torchrun   --base-model default --data data.jsonl --out runs/spaf
#   scripts/launch/single_node.sh accelerate --base-model default --data data.jsonl --out runs/spaf
#   scripts/launch/single_node.sh deepspeed  --base-model default --data data.jsonl --out runs/spaf
#
# Environment: NPROC (default: the number of GPUs, else 2), PRECISION (bf16 on GPU, no on CPU),
# DS_CONFIG (configs/deepspeed/zero2.json), PYTHON (python3). Other options go to `spaf-edge train`;
# --batch-size is per process, so the global batch is NPROC x --batch-size x --grad-accum.
set -euo pipefail

MODE=${1:?usage: single_node.sh torchrun|accelerate|deepspeed [spaf-edge train options]}
shift
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC=${NPROC:-$([[ ${GPUS:-0} -gt 0 ]] && echo "$GPUS" || echo 2)}
PRECISION=${PRECISION:-$([[ ${GPUS:-0} -gt 0 ]] && echo bf16 || echo no)}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero2.json}
PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

case $MODE in
    torchrun)  # torch.distributed DDP: nccl on GPU, gloo on CPU
        exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
            -m spaf_edge train --mixed-precision "$PRECISION" "$@" ;;
    accelerate)  # the same DDP run through accelerate's launcher (--multi_gpu also serves CPU-only hosts)
        MULTI=$([[ $NPROC -gt 1 ]] && echo --multi_gpu || true)
        exec "$PYTHON" -m accelerate.commands.launch $MULTI --num_processes "$NPROC" --num_machines 1 \
            --mixed_precision "$PRECISION" --dynamo_backend no -m spaf_edge train "$@" ;;
    deepspeed)  # DeepSpeed ZeRO (needs `pip install 'spaf-edge[distributed]'`)
        exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --no_local_rank --module \
            spaf_edge train --mixed-precision "$PRECISION" --deepspeed "$DS_CONFIG" "$@" ;;
    *)
        echo "unknown launcher '$MODE': expected torchrun, accelerate or deepspeed" >&2
        exit 2 ;;
esac
