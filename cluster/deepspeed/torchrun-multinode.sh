#!/usr/bin/env bash
# DeepSpeed ZeRO-3 (bf16, NCCL) pretraining without Ray: run this on EVERY node, the same command.
#
#   NNODES=2 NODE_RANK=0 HEAD=10.0.0.1 GPUS=8 cluster/deepspeed/torchrun-multinode.sh [key=value ...]
#   NNODES=2 NODE_RANK=1 HEAD=10.0.0.1 GPUS=8 cluster/deepspeed/torchrun-multinode.sh [key=value ...]
#
# Every rank runs `python -m sharp_unlearn.recipes.distributed worker` (the same function Ray Train
# calls); num_workers must equal NNODES x GPUS. Extra key=value arguments override the config.
# OUTPUT must be on storage shared by all nodes (each rank writes its checkpoint shard there).
# A dead node makes the others fail at their next collective after distributed.timeout_s;
# running the same commands again resumes from the last committed sharded checkpoint.
# (The DeepSpeed launcher works too: `deepspeed --hostfile H -m sharp_unlearn.recipes.distributed worker ...`.)
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${HEAD:?set HEAD (node 0 address)}"
GPUS="${GPUS:-8}"
PORT="${PORT:-29500}"
OUTPUT="${OUTPUT:-/mnt/shared/runs}"
HERE="$(cd "$(dirname "$0")" && pwd)"

# check the config (and the DeepSpeed JSON against it) on one node before starting anything
if [ "$NODE_RANK" = 0 ]; then
  python -m sharp_unlearn.recipes.distributed validate \
    distributed.backend=deepspeed distributed.zero_stage=3 distributed.use_gpu=true \
    distributed.num_workers=$((NNODES * GPUS)) distributed.launcher=torchrun \
    distributed.deepspeed_config="$HERE/zero3-bf16-nccl.json" output_dir="$OUTPUT" "$@" >/dev/null \
    || { echo "config rejected (see above)"; exit 2; }
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" NCCL_DEBUG="${NCCL_DEBUG:-WARN}" TORCH_NCCL_ASYNC_ERROR_HANDLING=1
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
  --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --max_restarts 0 \
  -m sharp_unlearn.recipes.distributed worker \
  distributed.backend=deepspeed distributed.zero_stage=3 distributed.use_gpu=true \
  distributed.num_workers=$((NNODES * GPUS)) distributed.launcher=torchrun \
  distributed.deepspeed_config="$HERE/zero3-bf16-nccl.json" output_dir="$OUTPUT" "$@"
