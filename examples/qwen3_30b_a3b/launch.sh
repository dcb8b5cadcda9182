#!/usr/bin/env bash
# Qwen3-30B-A3B-Base (MoE) with M2PO. Run the SAME command on every node of the job, each with its own NODE_RANK
# (nodes 0..T-1 train under torchrun with c10d rendezvous at MASTER_ADDR; the last ROLLOUT_NODES nodes
# run SGLang servers). From the repository root, e.g. on 3 nodes:
#   NNODES=3 NODE_RANK=<0..2> MASTER_ADDR=<node 0> ROLLOUT_HOSTS="<rollout node hostnames>" M2PO_API_KEY=<one secret, same on every node> \
#     MODEL_DIR=models/Qwen3-30B-A3B-Base TRAIN_DATA=data/deepscaler.jsonl bash examples/qwen3_30b_a3b/launch.sh [section.key=value ...]
# Layouts per node count and the memory estimate: examples/qwen3_30b_a3b/README.md. SLURM: examples/qwen3_30b_a3b/slurm.sbatch.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export RECIPE=${RECIPE:-$HERE/recipe.yaml}
export MODEL_DIR=${MODEL_DIR:-models/Qwen3-30B-A3B-Base}
export TRAIN_DATA=${TRAIN_DATA:-data/deepscaler.jsonl}
export ENGINE_TP=${ENGINE_TP:-8}  # GPUs per SGLang server
export ENGINE_ARGS=${ENGINE_ARGS:-"--ep-size 8"}  # SGLang flags of every server (flag names: SGLang 0.5.23)
export NNODES=${NNODES:-3}
export ROLLOUT_NODES=${ROLLOUT_NODES:-$((NNODES == 3 ? 1 : NNODES / 2))}  # 3 nodes: 2 train (EP 16), 1 serves
exec "$HERE/../common/node.sh" "$@"
