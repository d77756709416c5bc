#!/usr/bin/env bash
# VGPO on Qwen2.5-VL-32B (examples/configs/qwen25vl_32b.yaml): 4 nodes x 8 GPUs = TP 8 x PP 2 x DP 2.
# Run it once per node; it starts torchrun with one worker per GPU:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0's address> bash examples/vgpo_qwen25vl_32b.sh [args]
# args go to `python -m megatron_vgpo.train`: dotted overrides (trainer.total_steps=10) or --dry-run.
# On SLURM: sbatch examples/slurm/vgpo_qwen25vl_32b.sbatch (it runs this script on every node).
#
# Started BY torchrun (or a launcher that sets the same variables), it runs the trainer directly
# instead of nesting a second torchrun:
#   torchrun --nnodes 4 --node-rank <r> --master-addr <addr> --master-port 29500 --nproc-per-node 8 \
#       --no-python bash examples/vgpo_qwen25vl_32b.sh [args]
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   GPUS_PER_NODE [the count in CUDA_VISIBLE_DEVICES, else `nvidia-smi -L | wc -l`, else 8]
#   CONFIG [examples/configs/qwen25vl_32b.yaml]  PYTHON [python]  TORCHRUN [torchrun]
#   MAX_RESTARTS [3]: torchrun restarts the workers after a failure (a NaN run, a lost rank, a killed
#     process) this many times; each restart resumes from the checkpoint `latest` names.
# Relative paths in the config (checkpoints/, runs/, data/) resolve against the repository root, which
# must sit on a filesystem shared by all nodes: every rank writes its shard of a checkpoint there.
#
# NCCL is left to you; typical settings on InfiniBand / RoCE clusters (ask your admins):
#   NCCL_SOCKET_IFNAME=<bootstrap interface, e.g. eth0 or ib0>   NCCL_IB_HCA=<mlx5_0,mlx5_1,...>
#   NCCL_IB_GID_INDEX=3 (RoCE v2)   NCCL_DEBUG=WARN (INFO to see the chosen transports)
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-examples/configs/qwen25vl_32b.yaml}
PYTHON=${PYTHON:-python}

# Megatron wants one hardware queue per device so that its TP communication overlaps compute in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# The reward workers fork after tokenizers ran; its thread pool would deadlock in the children.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# Not PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: vLLM's sleep mode refuses that allocator.

log() { echo "[$(basename "$0")] $*" >&2; }

# torchrun sets these for its workers: run the trainer in this process, torchrun already spread us.
if [[ -n ${TORCHELASTIC_RUN_ID:-} || ( -n ${LOCAL_RANK:-} && -n ${RANK:-} && -n ${WORLD_SIZE:-} ) ]]; then
    cmd=("$PYTHON" -m megatron_vgpo.train --config "$CONFIG" "$@")
    if [[ ${LOCAL_RANK:-0} == 0 ]]; then
        log "under torchrun (rank ${RANK:-?} of ${WORLD_SIZE:-?}): $(printf '%q ' "${cmd[@]}")"
    fi
    exec "${cmd[@]}"
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z ${GPUS_PER_NODE:-} ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
        GPUS_PER_NODE=${#visible[@]}
    else
        GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if [[ ${GPUS_PER_NODE:-0} -lt 1 ]]; then
        GPUS_PER_NODE=8
    fi
fi

read -r -a torchrun <<< "${TORCHRUN:-torchrun}"
cmd=("${torchrun[@]}" --nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
     --master-port "$MASTER_PORT" --nproc-per-node "$GPUS_PER_NODE" --max-restarts "${MAX_RESTARTS:-3}"
     -m megatron_vgpo.train --config "$CONFIG" "$@")
log "node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPUs: $(printf '%q ' "${cmd[@]}")"
exec "${cmd[@]}"
