#!/usr/bin/env bash
# Qwen2.5-32B with M2PO. Run the SAME command on every node of the job, each with its own NODE_RANK
# (nodes 0..T-1 train under torchrun with c10d rendezvous at MASTER_ADDR; the last ROLLOUT_NODES nodes
# run SGLang servers). From the repository root, e.g. on 4 nodes:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> ROLLOUT_HOSTS="<rollout node hostnames>" M2PO_API_KEY=<one secret, same on every node> \
#     MODEL_DIR=models/Qwen2.5-32B TRAIN_DATA=data/deepscaler.jsonl bash examples/qwen2.5_32b/launch.sh [section.key=value ...]
# Layouts per node count and the memory estimate: examples/qwen2.5_32b/README.md. SLURM: examples/qwen2.5_32b/slurm.sbatch.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export RECIPE=${RECIPE:-$HERE/recipe.yaml}
export MODEL_DIR=${MODEL_DIR:-models/Qwen2.5-32B}
export TRAIN_DATA=${TRAIN_DATA:-data/deepscaler.jsonl}
export ENGINE_TP=${ENGINE_TP:-4}  # GPUs per SGLang server
export NNODES=${NNODES:-4}
exec "$HERE/../common/node.sh" "$@"
