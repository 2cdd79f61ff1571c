#!/usr/bin/env bash
# `medvit fit` on one or many machines with torchrun and Lightning's DDP strategy.
#
# Run the same command on every node (same RUN_ID, same MASTER_ADDR): torchrun's c10d rendezvous
# at MASTER_ADDR:MASTER_PORT forms the process group, and Lightning detects the torchelastic
# environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) instead of launching processes.
#
#   # 2 nodes x 8 GPUs (run on node01 and node02; node01 hosts the rendezvous):
#   NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node01 RUN_ID=pneu-1 \
#     bash scripts/torchrun_fit.sh -c configs/experiment/pneumoniamnist.yaml
#   # one machine, 2 GPUs:
#   GPUS_PER_NODE=2 bash scripts/torchrun_fit.sh -c configs/experiment/breastmnist.yaml
#   # CPU (gloo), e.g. to check a config: ACCELERATOR=cpu GPUS_PER_NODE=2 bash scripts/torchrun_fit.sh ...
#
# Arguments go to `medvit fit` before the topology flags below, so `-c config.yaml` comes first
# and cannot override the device count. `data.global_batch_size` stays the GLOBAL batch (each
# process gets global / (NNODES * GPUS_PER_NODE)) and `model.lr` stays the LR of that global
# batch: the same config trains the same way on 1 or N GPUs.
#
# RUN_DIR must be on a file system every node sees: rank 0 writes the run folder (config,
# metrics, checkpoints, wandb), and after fit every rank reads the best checkpoint to test it.
# Without a shared file system, add `--run.test_after_fit false` and test on one node later.
set -euo pipefail

NNODES="${NNODES:-1}"
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l)"
  [ "$GPUS_PER_NODE" -gt 0 ] || { echo "no GPU found: set GPUS_PER_NODE (and ACCELERATOR=cpu)" >&2; exit 1; }
fi
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
RUN_ID="${RUN_ID:-medvit-$(date +%Y%m%d-%H%M)}"  # must be equal on all nodes
RUN_DIR="${RUN_DIR:-runs/torchrun/$RUN_ID}"
# One OpenMP thread per process unless asked: N processes share the node's cores with workers.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id "$RUN_ID" \
  --max-restarts 0 \
  -m medvit fit "$@" \
  --trainer.accelerator "${ACCELERATOR:-gpu}" \
  --trainer.devices "$GPUS_PER_NODE" \
  --trainer.num_nodes "$NNODES" \
  --trainer.strategy ddp \
  --run.dir "$RUN_DIR"
