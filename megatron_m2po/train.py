"""The training loop, `train(cfg)`; its command is `m2po train` (`python -m megatron_m2po train` under torchrun).

Runs under `torchrun` (any TP x PP x DP) or as one plain process. Rank 0 also hosts the rollout side
(prompts, engines, rewards, replay queue: `rollout/producer.py`); the other ranks see it through
`trainer/distribute.py::SharedProducer`, which broadcasts its data; every rank trains (`trainer/policy.py`).
A call named `..._collective` (or a torch.distributed verb: broadcast, gather) is made by every rank, in the
same order. Per step, the staleness mode's phases (`megatron_m2po/staleness.py`) and the update, in order:

    before the step   sync / fixed: push the weights, generate in line until the FIFO holds K + 1 batches
                      (fixed with overlap: the newest of them in the background, beside the updates)
    per update        take the mini-batch -> broadcast -> [M2 pre-pass] -> micro-batches through Megatron's
                      schedule -> optimizer step -> version += 1 -> bounded: push every `sync_every` updates
    after the step    fixed with overlap: join the background batch -> metrics -> evaluation -> checkpoint

The modes (docs/training.md):
- `sync`:    generate a step batch with the current weights, train on it (s = 0).
- `fixed`:   the paper's FIFO: keep K generated batches queued; each step generates one more with the
             current weights (while it trains, `staleness.overlap_generation`) and trains on the oldest, so
             every batch is s = K x updates-per-step old (the first K batches come from the base model).
- `bounded`: a background thread generates continuously; the queue admits work only if it can be
             consumed within `max_staleness` updates, and drops (counts) what got too stale.
SIGTERM (`trainer/stop.py`) ends the run at the next phase, with a checkpoint, in every mode.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from megatron_m2po import platform
from megatron_m2po.checkpoint.convert import export_hf_dir_collective
from megatron_m2po.checkpoint.megatron_ckpt import is_megatron_checkpoint
from megatron_m2po.config import Config, validate_parallel
from megatron_m2po.metrics import MetricsLogger
from megatron_m2po.models import load_hf_config
from megatron_m2po.rollout.producer import Producer
from megatron_m2po.staleness import staleness_mode
from megatron_m2po.trainer import checkpointing
from megatron_m2po.trainer.distribute import SharedProducer, gather_metrics_to_rank0
from megatron_m2po.trainer.engine_sync import EngineSync
from megatron_m2po.trainer.policy import Policy
from megatron_m2po.trainer.run_dir import check_run_dir, mark_run_dir
from megatron_m2po.trainer.run_state import ConsumedLog, restore_collective, save_collective
from megatron_m2po.trainer.step_metrics import StepClock, mean_metrics, staleness_of, step_scalars
from megatron_m2po.trainer.stop import StopRequest

logger = logging.getLogger("megatron_m2po.train")


def train(cfg: Config, *, resume: bool | str = False) -> dict[str, float]:
    """Run (or continue, with `resume`: True = the newest checkpoint that loads, a str = that checkpoint)
    the job described by `cfg`; returns the last step's metrics (complete on rank 0)."""
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    # before Megatron starts: a layout it cannot split is a config error naming the key, not its traceback
    validate_parallel(
        cfg,
        int(os.environ.get("WORLD_SIZE", "1")),
        load_hf_config(cfg.model.path),
        transformer_engine=platform.has_transformer_engine(),
    )
    check_run_dir(cfg, resume=resume)  # nothing written yet: a directory of other files is refused
    platform.init_distributed(
        cfg.parallel.tensor,
        cfg.parallel.pipeline,
        seed=cfg.train.seed,
        context_parallel=cfg.parallel.context,
        expert_parallel=cfg.parallel.expert,
        expert_tensor_parallel=cfg.parallel.expert_tensor_size,
    )
    run_dir, is_rank0 = Path(cfg.logging.run_dir), platform.rank() == 0
    if is_rank0:
        mark_run_dir(run_dir)
        checkpointing.remove_partial(run_dir / "checkpoints")  # before writing: a failed save's disk
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # ---- model side (every rank builds its shard), and where the run stands
    trainer = Policy(cfg)
    progress, saved = restore_collective(trainer, run_dir / "checkpoints", resume)

    # ---- rollout side (rank 0; the other ranks receive its data by broadcast), metrics, signals
    producer = SharedProducer(Producer(cfg, trainer, run_dir, saved=saved) if is_rank0 else None)
    consumed_log = ConsumedLog(run_dir / "consumed.jsonl", keep_through_step=progress.step, enabled=is_rank0)
    metrics_log = MetricsLogger(
        run_dir,
        total_steps=cfg.train.steps,
        start_step=progress.step,
        backends=cfg.logging.backends,
        settings=cfg.logging,
        config=dataclasses.asdict(cfg),
        console=cfg.logging.console,
        enabled=is_rank0,
    )
    if progress.skipped_checkpoints:  # each named in a warning by --resume; counted beside the run's curves
        skipped = {"train/checkpoints_skipped_on_resume": progress.skipped_checkpoints}
        metrics_log.log(progress.step, skipped, console=False)
    stop = StopRequest.on_sigterm()
    # the engines start from the HF model dir, which is version 0 of a fresh run; after a resume, or when the
    # policy is a Megatron checkpoint (which engines cannot load), what they hold is unknown until a push
    engines_hold = 0 if progress.version == 0 and not is_megatron_checkpoint(cfg.model.path) else None
    engines = EngineSync(trainer, producer.farm, version=engines_hold)
    engines.push_collective(progress.version)
    mode = staleness_mode(cfg, producer, trainer, engines)  # which mini-batches a step trains on, when to sync
    mode.start_generation(progress.version)  # bounded: rank 0's producer thread, from now on
    if cfg.eval.every and progress.step == 0:
        metrics_log.log(0, evaluate_collective(producer, engines, progress.version), console=False)

    last: dict[str, float] = {}
    saved_step = progress.step if saved is not None else None  # the step of the newest checkpoint on disk
    try:
        while progress.step < cfg.train.steps:
            clock = StepClock()
            mode.generate_before_step_collective(progress.version, clock, stop)
            # ---- the step's optimizer updates, one per mini-batch
            results, consumed = [], []
            for update in range(cfg.updates_per_step):
                groups = mode.take_minibatch_collective(update, progress.version, clock, stop)
                if groups is None:  # SIGTERM ended the wait: the step ends here
                    break
                consumed.append((progress.version, groups))
                consumed_log.append(progress.step + 1, progress.version, groups)
                with clock("perf/time_train"):
                    results.append(trainer.update_collective(groups, progress.version))
                progress.version += 1
                producer.publish_version(progress.version)
                mode.push_weights_after_update_collective(progress.version, clock)
            mode.join_generation_after_step_collective(clock)
            if not results:  # SIGTERM before this step's first update: the state is the previous step's
                if saved_step != progress.step:
                    save_collective(run_dir / "checkpoints", progress, trainer, producer)
                break
            progress.step += 1

            # ---- metrics (complete on rank 0), evaluation, checkpoint
            scalars = gather_metrics_to_rank0(mean_metrics(results))
            if cfg.eval.every and (progress.step % cfg.eval.every == 0 or progress.step == cfg.train.steps):
                scalars.update(evaluate_collective(producer, engines, progress.version))
            scalars.update(step_scalars(producer, trainer, engines, consumed, clock))
            if cfg.logging.histograms:
                metrics_log.histogram(progress.step, "train/staleness", staleness_of(consumed))
            metrics_log.log(progress.step, scalars)
            last = scalars
            stop_now = stop.requested_collective()
            due = cfg.checkpoint.save_every and progress.step % cfg.checkpoint.save_every == 0
            final = progress.step == cfg.train.steps and cfg.checkpoint.save_at_end
            if due or final or stop_now:
                save_collective(run_dir / "checkpoints", progress, trainer, producer)
                saved_step = progress.step
            if stop_now:
                break
        if cfg.checkpoint.export_hf_at_end and progress.step == cfg.train.steps:
            export_hf_dir_collective(trainer.model, trainer.hf_config, run_dir / "hf", source_dir=cfg.model.path)
    finally:
        producer.close()
        metrics_log.close()
    return last


# ------------------------------------------------------------------------------------------ helpers


def evaluate_collective(producer: SharedProducer, engines: EngineSync, version: int) -> dict[str, float]:
    """Held-out accuracy through the engines (rank 0), after giving them the current weights."""
    engines.push_collective(version)
    return producer.evaluate(version)
