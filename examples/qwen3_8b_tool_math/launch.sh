#!/usr/bin/env bash
# Qwen3-8B with M2PO on tool-integrated math (rollout.env=tool_math). Run the SAME command on every node of the job, each with its own NODE_RANK
# (nodes 0..T-1 train under torchrun with c10d rendezvous at MASTER_ADDR; the last ROLLOUT_NODES nodes
# run SGLang servers). From the repository root, e.g. on 2 nodes:
#   NNODES=2 NODE_RANK=<0..1> MASTER_ADDR=<node 0> ROLLOUT_HOSTS="<rollout node hostnames>" M2PO_API_KEY=<one secret, same on every node> \
#     MODEL_DIR=models/Qwen3-8B TRAIN_DATA=data/deepscaler.jsonl bash examples/qwen3_8b_tool_math/launch.sh [section.key=value ...]
# Layouts per node count and the memory estimate: examples/qwen3_8b_tool_math/README.md. SLURM: examples/qwen3_8b_tool_math/slurm.sbatch.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export RECIPE=${RECIPE:-$HERE/recipe.yaml}
export MODEL_DIR=${MODEL_DIR:-models/Qwen3-8B}
export TRAIN_DATA=${TRAIN_DATA:-data/deepscaler.jsonl}
export ENGINE_TP=${ENGINE_TP:-1}  # GPUs per SGLang server
export NNODES=${NNODES:-2}
exec "$HERE/../common/node.sh" "$@"
