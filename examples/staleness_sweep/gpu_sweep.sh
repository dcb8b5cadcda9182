#!/usr/bin/env bash
# The staleness sweep at the paper's scale: Qwen3-1.7B-Base on DeepScaleR-Preview, the paper's protocol
# (fixed lag: a FIFO of K step batches, 4 updates per step, s = 4K), one job per (loss, s).
# Usage, from the repository root:
#   bash examples/staleness_sweep/gpu_sweep.sh              # one 8-GPU node per job, run one after another
#   SUBMIT=sbatch bash examples/staleness_sweep/gpu_sweep.sh   # one SLURM job each (examples/qwen3_1.7b/slurm.sbatch)
#   SUBMIT=echo bash examples/staleness_sweep/gpu_sweep.sh     # print the jobs without running them
# Optional: LOSSES="grpo m2po" STALENESS="0 256" STEPS=1000 MODEL_DIR=... TRAIN_DATA=... EVAL_DATA=...
# s = 0 runs once, as on_policy: with fresh data (behaviour log-probs recomputed by the trainer) every
# importance ratio is 1 and every loss is the same gradient.
# Then compare runs/<job>/tb (eval/accuracy, loss/masked_fraction, loss/clip_fraction, loss/m2_before) with
# `tensorboard --logdir runs/` or `m2po plot runs/<job>`, and evaluate each runs/<job>/hf with `m2po evaluate`.
set -euo pipefail
LOSSES=${LOSSES:-"on_policy grpo grpo_noclip m2po m2po_clip"}
STALENESS=${STALENESS:-"0 4 16 64 256"}
STEPS=${STEPS:-1000}
SUBMIT=${SUBMIT:-bash}
UPDATES_PER_STEP=4  # 256 prompts per step / 64 per update (the recipe)
script=examples/qwen3_1.7b/launch.sh
[[ $SUBMIT == sbatch ]] && script=examples/qwen3_1.7b/slurm.sbatch
for loss in $LOSSES; do
  for s in $STALENESS; do
    [[ $loss == on_policy ]] && on_policy=1 || on_policy=0
    ((on_policy != (s == 0))) && continue
    if ((s == 0)); then
      mode=(staleness.mode=sync staleness.fixed_lag_steps=0)
    else
      if ((s % UPDATES_PER_STEP)); then echo "s=$s is not a multiple of $UPDATES_PER_STEP updates per step" >&2; exit 2; fi
      k=$((s / UPDATES_PER_STEP))
      mode=(staleness.mode=fixed "staleness.fixed_lag_steps=$k" "staleness.queue_capacity=$((256 * (k + 1)))")
    fi
    run=sweep-${loss}-s${s}
    [[ $SUBMIT == echo ]] || echo "== $run"
    RUN_ID=$run $SUBMIT $script "${mode[@]}" "algorithm.loss=$loss" rollout.behavior_logprobs=trainer \
      "train.steps=$STEPS" "logging.run_dir=runs/$run"
  done
done
