#!/usr/bin/env bash
# Data-parallel SpAF training on several machines. Requirements: the repository, the base model and
# the data at the same paths on every node; --out on a shared filesystem (global rank 0 writes it,
# and every rank reads the checkpoint on --resume); the nodes reach MASTER_ADDR:MASTER_PORT.
#
# torchrun / accelerate: run the same command on every node, with NODE_RANK=0 on the master:
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 NPROC=8 scripts/launch/multi_node.sh torchrun --data ... --out ...
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 NPROC=8 scripts/launch/multi_node.sh torchrun --data ... --out ...
#   (accelerate: the same with `accelerate`; settings from scripts/launch/accelerate_multi_node.yaml)
# deepspeed: run once, on the first host of the hostfile (it starts the others over passwordless ssh):
#   HOSTFILE=scripts/launch/hostfile scripts/launch/multi_node.sh deepspeed --data ... --out ...
set -euo pipefail

MODE=${1:?usage: multi_node.sh torchrun|accelerate|deepspeed [spaf-edge train options]}
shift
PYTHON=${PYTHON:-python3}
PRECISION=${PRECISION:-bf16}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

case $MODE in
    torchrun)
        exec "$PYTHON" -m torch.distributed.run --nnodes "${NNODES:?set NNODES}" --node_rank "${NODE_RANK:?set NODE_RANK}" \
            --nproc_per_node "${NPROC:?set NPROC (GPUs per node)}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" \
            --master_port "$MASTER_PORT" -m spaf_edge train --mixed-precision "$PRECISION" "$@" ;;
    accelerate)
        exec "$PYTHON" -m accelerate.commands.launch --config_file scripts/launch/accelerate_multi_node.yaml \
            --num_machines "${NNODES:?set NNODES}" --machine_rank "${NODE_RANK:?set NODE_RANK}" \
            --num_processes "$(( NNODES * ${NPROC:?set NPROC (GPUs per node)} ))" \
            --main_process_ip "${MASTER_ADDR:?set MASTER_ADDR}" --main_process_port "$MASTER_PORT" \
            --mixed_precision "$PRECISION" -m spaf_edge train "$@" ;;
    deepspeed)
        exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "${HOSTFILE:-scripts/launch/hostfile}" \
            --master_port "$MASTER_PORT" --no_local_rank --module \
            spaf_edge train --mixed-precision "$PRECISION" --deepspeed "$DS_CONFIG" "$@" ;;
    *)
        echo "unknown launcher '$MODE': expected torchrun, accelerate or deepspeed" >&2
        exit 2 ;;
esac
