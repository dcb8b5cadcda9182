#!/usr/bin/env bash
# One node of a megatron_m2po job: a trainer node (torchrun, c10d rendezvous) or a rollout node
# (SGLang servers). Called by examples/<model>/launch.sh (plain ssh / pdsh / k8s) and by
# examples/<model>/slurm.sbatch (srun), once per node, with the example's settings in the environment.
#
# Layout: nodes 0 .. TRAIN_NODES-1 train, nodes TRAIN_NODES .. NNODES-1 serve SGLang.
# With NNODES=1 and GPUS_TRAIN < 8 the node does both: GPUs 0..GPUS_TRAIN-1 train, the rest serve.
#
# Required: RECIPE, MODEL_DIR, TRAIN_DATA, ENGINE_TP.  Multi-node: NNODES, NODE_RANK, MASTER_ADDR and
# ROLLOUT_HOSTS (space-separated hostnames of the rollout nodes, in node order).
# Optional: ENGINE_ARGS (extra SGLang server flags, e.g. "--ep-size 8" for MoE expert parallelism),
# ROLLOUT_NODES (default NNODES/2), GPUS_PER_NODE (8), GPUS_TRAIN (GPUS_PER_NODE),
# EVAL_DATA (your own held-out file, evaluated beside the recipe's eval.benchmarks), RUN_ID, RDZV_PORT (29500), ENGINE_BASE_PORT (30000), LOG_DIR, extra `a.b=c` overrides as args.
# ENGINE_SUPERVISION: flags for `m2po engines`' supervision of its servers (it restarts one that exits or stops
# answering), e.g. "--max-restarts 10 --health-timeout 30" (docs/rollout.md, "Failure model").
#
# Two environments (docs/rollout.md): the trainer runs under TRAINER_PYTHON (the NGC image: torch, Transformer
# Engine, megatron-core; Dockerfile), the SGLang servers under ROLLOUT_PYTHON (sglang==0.5.23's own torch;
# Dockerfile.rollout). Each is a command, e.g. ROLLOUT_PYTHON="apptainer exec --nv rollout.sif python";
# both default to `python`.
# Keys: M2PO_API_KEY (and optional M2PO_ADMIN_API_KEY for control routes) guard the servers; every node
# needs the same value (slurm.sbatch makes one per job). A single node makes its own when unset.
set -euo pipefail

: "${RECIPE:?set RECIPE (a YAML recipe)}" "${MODEL_DIR:?set MODEL_DIR (HF model dir)}"
: "${TRAIN_DATA:?set TRAIN_DATA (jsonl/parquet prompts)}" "${ENGINE_TP:?set ENGINE_TP}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ROLLOUT_NODES=${ROLLOUT_NODES:-$((NNODES / 2))}
TRAIN_NODES=$((NNODES - ROLLOUT_NODES))
GPUS_TRAIN=${GPUS_TRAIN:-$GPUS_PER_NODE}
RDZV_PORT=${RDZV_PORT:-29500}
ENGINE_BASE_PORT=${ENGINE_BASE_PORT:-30000}
RUN_ID=${RUN_ID:-m2po-$(basename "$(dirname "$RECIPE")")}
LOG_DIR=${LOG_DIR:-runs/$RUN_ID/logs}
mkdir -p "$LOG_DIR"
read -ra TRAINER_PY <<<"${TRAINER_PYTHON:-python}"
read -ra ROLLOUT_PY <<<"${ROLLOUT_PYTHON:-python}"
if [[ -z "${M2PO_API_KEY:-}" ]]; then
  if ((NNODES > 1)); then
    echo "node.sh: set M2PO_API_KEY to one secret shared by every node of the job," \
      "e.g. M2PO_API_KEY=\$(openssl rand -hex 32); the engine servers refuse calls without it" >&2
    exit 1
  fi
  M2PO_API_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
fi
export M2PO_API_KEY  # read by the launcher (--api-key-env) and the trainer (rollout.api_key_env)

serve() {  # serve GPUS on this node with supervised SGLang servers of ENGINE_TP GPUs each, bound to HOST (blocks)
  local gpus=$1 host=$2
  local servers=$((gpus / ENGINE_TP))
  local supervision
  read -ra supervision <<<"${ENGINE_SUPERVISION:-}"
  exec "${ROLLOUT_PY[@]}" -m megatron_m2po engines --model "$MODEL_DIR" \
    --servers "$servers" --tp "$ENGINE_TP" --host "$host" --base-port "$ENGINE_BASE_PORT" \
    --server-args "${ENGINE_ARGS:-}" --log-dir "$LOG_DIR/engines-node$NODE_RANK" "${supervision[@]}"
}

engine_urls() {  # comma-separated URLs of every server of the job
  local hosts=$1 servers=$2 urls=""
  for h in $hosts; do
    for ((i = 0; i < servers; i++)); do urls+="${urls:+,}http://$h:$((ENGINE_BASE_PORT + i))"; done
  done
  echo "$urls"
}

wait_healthy() {
  local url
  for url in ${1//,/ }; do
    until curl -sf "$url/health" >/dev/null; do echo "waiting for engine $url"; sleep 10; done
  done
}

if ((NNODES == 1 && GPUS_TRAIN < GPUS_PER_NODE)); then
  # single node, split: the last GPUs serve, the first GPUs train
  serve_gpus=$((GPUS_PER_NODE - GPUS_TRAIN))
  CUDA_VISIBLE_DEVICES=$(seq -s, "$GPUS_TRAIN" $((GPUS_PER_NODE - 1))) NODE_RANK=0 serve "$serve_gpus" 127.0.0.1 \
    >"$LOG_DIR/engines.log" 2>&1 &
  ENGINE_PID=$!
  trap 'kill $ENGINE_PID 2>/dev/null || true' EXIT
  URLS=$(engine_urls 127.0.0.1 $((serve_gpus / ENGINE_TP)))
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS_TRAIN - 1)))
elif ((NODE_RANK >= TRAIN_NODES)); then
  serve "$GPUS_PER_NODE" 0.0.0.0
else
  : "${ROLLOUT_HOSTS:?set ROLLOUT_HOSTS to the hostnames of the rollout nodes}"
  URLS=$(engine_urls "$ROLLOUT_HOSTS" $((GPUS_PER_NODE / ENGINE_TP)))
fi

wait_healthy "$URLS"
overrides=("model.path=$MODEL_DIR" "data.path=$TRAIN_DATA" "rollout.engine=sglang" "rollout.urls=$URLS"
           "logging.run_dir=runs/$RUN_ID")
[[ -n "${EVAL_DATA:-}" ]] && overrides+=("eval.path=$EVAL_DATA")
exec "${TRAINER_PY[@]}" -m torch.distributed.run \
  --nnodes "$TRAIN_NODES" --nproc-per-node "$GPUS_TRAIN" --node-rank "$NODE_RANK" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$RDZV_PORT" --rdzv-id "$RUN_ID" \
  -m megatron_m2po train --config "$RECIPE" "${overrides[@]}" "$@"
