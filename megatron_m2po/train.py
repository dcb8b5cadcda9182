"""The training loop: `python -m megatron_m2po.train --config RECIPE.yaml [a.b=value ...] [--resume]`.

Runs under `torchrun` (any TP x PP x DP) or as one plain process. Rank 0 also hosts the rollout side
(prompts, engines, rewards, replay queue); every rank trains. Per step:

    batch from the queue -> broadcast -> per mini-batch: [M2 pre-pass] -> micro-batches through Megatron's
    schedule -> optimizer step -> version += 1 -> weight sync -> metrics -> checkpoint

The three staleness modes are the same calls in a different order (docs/training.md):
- `sync`:    generate a step batch with the current weights, train on it (s = 0).
- `fixed`:   the paper's FIFO: keep K generated batches queued; each step generates one more with the
             current weights and trains on the oldest, so every batch is s = K x updates-per-step old
             (the first K batches come from the base model).
- `bounded`: a background thread generates continuously; the queue admits work only if it can be
             consumed within `max_staleness` updates, and drops (counts) what got too stale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_m2po import algorithms, console, platform
from megatron_m2po.checkpoint.megatron_ckpt import is_megatron_checkpoint
from megatron_m2po.config import Config, ConfigError, load_config, validate_parallel
from megatron_m2po.io_errors import WriteError, naming_write_errors
from megatron_m2po.metrics import MetricsLogger, gpu_peak_flops, mfu
from megatron_m2po.models import load_hf_config, load_policy
from megatron_m2po.rollout.manager import ProducerStopped
from megatron_m2po.sync import WeightSync
from megatron_m2po.trainer import checkpointing
from megatron_m2po.trainer.batching import (
    TRAINER_LOGPROBS_KEY,
    groups_to_rows,
    make_microbatches,
    plan_microbatches,
    rollout_metrics,
    split_minibatches,
)
from megatron_m2po.trainer.distribute import broadcast_from_rank0, merge_metrics_to_rank0, rank
from megatron_m2po.trainer.optimizer import build_optimizer, wrap_ddp
from megatron_m2po.trainer.producer import Producer
from megatron_m2po.trainer.step import forward_logprobs, train_update
from megatron_m2po.types import Group

logger = logging.getLogger("megatron_m2po.train")


@dataclass
class Progress:
    """What a checkpoint must restore besides weights: where the run is."""

    step: int = 0  # training steps done
    version: int = 0  # optimizer updates done = policy version


def _dtype(cfg: Config) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return platform.default_dtype()
    return getattr(torch, cfg.model.dtype)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Trainer:
    """The model side: policy, optimizer, loss, and the per-batch update (every rank)."""

    def __init__(self, cfg: Config, model=None):
        """`model`: an already built GPTModel for `cfg.model.path`'s config (bench/mfu.py: random weights,
        no checkpoint to read); default: load the policy from `cfg.model.path`."""
        self.cfg = cfg
        self.dtype = _dtype(cfg)
        self.hf_config = load_hf_config(cfg.model.path)
        if model is None:
            model = load_policy(cfg.model.path, dtype=self.dtype, parallel=cfg.parallel)
        self.model = wrap_ddp(model, cfg.parallel)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.dtype)
        self.loss_fn = algorithms.PolicyLoss.from_config(cfg.algorithm)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.pad_id = int(
            getattr(self.hf_config, "pad_token_id", None) or getattr(self.hf_config, "eos_token_id", 0) or 0
        )
        mp = (
            parallel_state.get_tensor_model_parallel_world_size()
            * parallel_state.get_pipeline_model_parallel_world_size()
        )
        self.weight_sync: WeightSync | None = None  # built on first use (DP replica 0 only)
        self.weight_sync_metrics: dict[str, float] = {}
        self.synced_version: int | None = None  # the version the engines hold
        self.num_params = sum(p.numel() for p in self.model.parameters()) * mp  # for the MFU estimate

    def _microbatches(self, rows, version: int):
        """This DP rank's micro-batches of `rows` (`batching.plan_microbatches`), in one shape wherever the
        pipeline's p2p buffers need it: padded to the longest of `rows`, or packed to the token budget;
        lengths are multiples of the TP size under sequence parallelism (it splits the sequence)."""
        t = self.cfg.train
        plan = plan_microbatches(
            [len(r.tokens) for r in rows],
            self.dp_size,
            micro_batch_size=t.micro_batch_size,
            max_tokens=t.max_tokens_per_microbatch,
        )
        multiple = self.cfg.parallel.tensor if self.cfg.parallel.sequence_parallel else 1
        pack = t.pack_sequences or bool(t.max_tokens_per_microbatch)
        if pack:
            seq_len = None
            longest = max(sum(len(rows[i].tokens) for i in mb) for shard in plan for mb in shard)
            fixed = parallel_state.get_pipeline_model_parallel_world_size() > 1
            packed_len = _round_up(max(t.max_tokens_per_microbatch, longest), multiple) if fixed else None
        else:
            seq_len, packed_len = _round_up(max(len(r.tokens) for r in rows), multiple), None
        return make_microbatches(
            rows,
            plan[self.dp_rank],
            consumer_version=version,
            pad_id=self.pad_id,
            pack=pack,
            seq_len=seq_len,
            batch_size=t.micro_batch_size,
            packed_len=packed_len,
            multiple=multiple,
        )

    def update(self, groups: list[Group], version: int) -> dict[str, float]:
        """One optimizer update on one mini-batch of groups consumed at policy `version`."""
        cfg, a = self.cfg, self.cfg.algorithm
        rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
        ids = [g.prompt_id for g in groups for _ in g.samples]
        advantages = algorithms.compute_advantages(rewards, ids, estimator=a.advantage)
        rows = groups_to_rows(groups, advantages, behavior_source=cfg.rollout.behavior_logprobs)
        mbs = self._microbatches(rows, version)
        # The loss is a mean over the whole mini-batch (all DP ranks): DDP averages over DP, hence / dp.
        if self.loss_fn.aggregation == "token-mean":
            total = sum(len(r.tokens) - r.prompt_len for r in rows)
        else:
            total = sum(1 for r in rows if len(r.tokens) > r.prompt_len)
        normalizer = max(total, 1) / self.dp_size
        return train_update(
            self.model,
            self.optimizer,
            self.scheduler,
            mbs,
            self.loss_fn,
            temperature=cfg.rollout.temperature,
            normalizer=normalizer,
        )

    def recompute_behavior_logprobs(self, groups: list[Group] | None) -> None:
        """rollout.behavior_logprobs=trainer: log-probs of the current (= producing) weights, stored in the groups.

        Collective. Each DP rank computes an interleaved share; rank 0 collects them into its groups.
        """
        from megatron_m2po.trainer.distribute import gather_to_rank0

        groups = broadcast_from_rank0(groups)
        zeros = torch.zeros(len([s for g in groups for s in g.samples]))
        rows = groups_to_rows(groups, zeros, behavior_source="engine")
        out: dict[int, list[float]] = {}
        mbs = self._microbatches(rows, version=0)  # none on a rank whose share is empty
        if mbs:
            lps = forward_logprobs(self.model, mbs, self.cfg.rollout.temperature)
            for mb, lp in zip(mbs, lps):
                for i, lp_row in zip(mb.row_index.tolist(), lp):
                    if i >= 0:
                        r = rows[i]
                        out[i] = lp_row[r.prompt_len - 1 : len(r.tokens) - 1].tolist()
        parts = gather_to_rank0(out if parallel_state.is_pipeline_last_stage() else {})
        if parts is None:
            return
        merged = {k: v for p in parts for k, v in p.items()}
        i = 0
        for g in groups:  # on rank 0 these are the producer's own Group objects
            g.metadata[TRAINER_LOGPROBS_KEY] = [merged[i + j] for j in range(len(g.samples))]
            i += len(g.samples)

    def state_dict_extra(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}


# After a SIGTERM, a wait for the rest of a step that has begun gives the producer this long before the step
# is ended short; a wait at a step's start ends at once (the state is then exactly the previous step's).
SIGTERM_GRACE_S = 10.0


def _install_sigterm() -> dict[str, Any]:
    """SIGTERM (a scheduler's pre-emption) -> save a checkpoint after the current step, then exit."""
    flag: dict[str, Any] = {"stop": False, "at": None}

    def handler(signum, frame):
        logger.warning("SIGTERM: checkpointing after this step (sooner if it waits for data), then exiting")
        flag["stop"], flag["at"] = True, time.monotonic()

    signal.signal(signal.SIGTERM, handler)
    return flag


def train(cfg: Config, *, resume: bool | str = False) -> dict[str, float]:
    """Run (or continue, with `resume`: True = the newest checkpoint that loads, a str = that checkpoint)
    the job described by `cfg`; returns rank 0's last metrics."""
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    # before Megatron starts: a layout it cannot split is a config error naming the key, not its traceback
    validate_parallel(cfg, int(os.environ.get("WORLD_SIZE", "1")), load_hf_config(cfg.model.path))
    platform.init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.train.seed)
    run_dir, is_rank0 = Path(cfg.logging.run_dir), rank() == 0
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_partial(run_dir / "checkpoints")  # before writing: a failed save's disk
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # ---- model side (every rank), and where the run stands
    trainer = Trainer(cfg)
    progress, saved = restore(trainer, run_dir / "checkpoints", resume)

    # ---- rollout side (rank 0), metrics, signals
    producer = Producer(cfg, trainer, run_dir, saved=saved) if is_rank0 else None
    consumed_log = (
        ConsumedLog(run_dir / "consumed.jsonl", keep_through_step=progress.step) if is_rank0 else None
    )
    metrics_log = MetricsLogger(
        run_dir,
        total_steps=cfg.train.steps,
        start_step=progress.step,
        tensorboard=cfg.logging.tensorboard,
        console=cfg.logging.console,
        enabled=is_rank0,
    )
    stop = _install_sigterm()
    if progress.version > 0 or is_megatron_checkpoint(cfg.model.path):
        sync_weights(producer, trainer, progress.version)  # the engines loaded the HF weights (version 0)
    trainer.synced_version = progress.version
    if cfg.staleness.mode == "bounded" and is_rank0:
        producer.start(progress.version)
    if cfg.eval.every and progress.step == 0:
        metrics_log.log(0, evaluate(producer, trainer, progress.version), console=False)

    u, P, B = cfg.updates_per_step, cfg.train.prompts_per_step, cfg.train.prompts_per_update
    last: dict[str, float] = {}
    saved_step = progress.step if saved is not None else None  # the step of the newest checkpoint on disk
    try:
        while progress.step < cfg.train.steps:
            clock = StepClock()
            # ---- the step's data: sync/fixed generate in line (the FIFO of K batches); bounded takes per update
            if cfg.staleness.mode in ("sync", "fixed"):
                fill_queue(producer, trainer, progress.version, clock)
                with clock("perf/time_wait"):
                    minibatches = split_minibatches(take(producer, P), B)
            # ---- u optimizer updates
            results, consumed = [], []
            for j in range(u):
                if cfg.staleness.mode == "bounded":
                    with clock("perf/time_wait"):
                        groups = take(producer, B, stop, grace=SIGTERM_GRACE_S if j else 0.0)
                    if groups is None:  # SIGTERM while waiting: this step ends here, then checkpoint and exit
                        break
                else:
                    groups = minibatches[j]
                consumed.append((progress.version, groups))
                if consumed_log is not None:
                    consumed_log.append(progress.step + 1, progress.version, groups)
                with clock("perf/time_train"):
                    results.append(trainer.update(groups, progress.version))
                progress.version += 1
                if producer is not None:
                    producer.publish_version(progress.version)
                if cfg.staleness.mode == "bounded" and progress.version % cfg.rollout.sync_every == 0:
                    with clock("perf/time_sync"):
                        sync_weights(producer, trainer, progress.version)
            if not results:  # stopped before this step's first update: the state is the previous step's
                if saved_step != progress.step:
                    save(run_dir / "checkpoints", progress, trainer, producer)
                break
            progress.step += 1

            # ---- metrics, evaluation, checkpoint
            scalars = merge_metrics_to_rank0(_mean_metrics(results))
            if cfg.eval.every and (progress.step % cfg.eval.every == 0 or progress.step == cfg.train.steps):
                scalars.update(evaluate(producer, trainer, progress.version))
            if is_rank0:
                scalars.update(step_scalars(producer, trainer, consumed, clock))
                if cfg.logging.histograms:
                    metrics_log.histogram(progress.step, "train/staleness", staleness_of(consumed))
                metrics_log.log(progress.step, scalars)
                last = scalars
            stop_now = broadcast_from_rank0(stop["stop"])
            due = cfg.checkpoint.save_every and progress.step % cfg.checkpoint.save_every == 0
            final = progress.step == cfg.train.steps and cfg.checkpoint.save_at_end
            if due or final or stop_now:
                save(run_dir / "checkpoints", progress, trainer, producer)
                saved_step = progress.step
            if stop_now:
                break
        if cfg.checkpoint.export_hf_at_end and progress.step == cfg.train.steps:
            export_hf(trainer, run_dir / "hf", cfg.model.path)
    finally:
        if producer is not None:
            producer.close()
        metrics_log.close()
    return last


# ------------------------------------------------------------------------------------------ helpers


def restore(trainer: Trainer, ckpt_root: Path, resume: bool | str) -> tuple[Progress, dict | None]:
    """With `resume`, load the newest checkpoint that loads (or the one `resume` names) into the trainer;
    return the progress and the saved state."""
    found = None
    if resume:
        path = resume if isinstance(resume, str) else None
        found = checkpointing.load_newest_checkpoint(ckpt_root, trainer.model, trainer.optimizer, path=path)
    if found is None:
        if resume:
            logger.info("--resume: no checkpoint in %s, starting fresh", ckpt_root)
        elif checkpointing.list_checkpoints(ckpt_root):
            raise ConfigError(
                f"'logging.run_dir': {ckpt_root.parent} already holds checkpoints of another run; pass --resume "
                "to continue it, or choose a new run_dir"
            )
        return Progress(), None
    ckpt, saved = found
    trainer.scheduler.load_state_dict(saved["scheduler"])
    progress = Progress(step=saved["step"], version=saved["version"])
    logger.info("resumed from %s at step %d (version %d)", ckpt, progress.step, progress.version)
    return progress, saved


class StepClock:
    """Wall time per phase of a step (`perf/time_*`), and of the whole step."""

    PHASES = ("perf/time_generate", "perf/time_wait", "perf/time_train", "perf/time_sync")

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] += time.monotonic() - t

    def scalars(self) -> dict[str, float]:
        return {**self.seconds, "perf/time_step": time.monotonic() - self.start}


def take(
    producer: Producer | None, num_groups: int, stop: dict | None = None, grace: float = 0.0
) -> list[Group] | None:
    """The next `num_groups` groups of rank 0's queue, on every rank. None on every rank when rank 0 is still
    waiting `grace` seconds after a SIGTERM (`stop`); a producer that stopped (`ProducerStopped`) raises on
    every rank."""

    def stop_requested() -> bool:
        return stop is not None and stop["stop"] and time.monotonic() - stop["at"] >= grace

    out: list[Group] | ProducerStopped | None = None
    if producer is not None:
        try:
            out = producer.take(num_groups, stop_requested=stop_requested)
        except ProducerStopped as e:
            out = e
    out = broadcast_from_rank0(out)
    if isinstance(out, ProducerStopped):
        raise out
    return out


def staleness_of(consumed: list[tuple[int, list[Group]]]) -> list[int]:
    """Per group: the version that consumed it - the oldest version that produced any of its tokens."""
    return [version - g.min_version for version, groups in consumed for g in groups]


def step_scalars(producer: Producer, trainer: Trainer, consumed, clock: StepClock) -> dict[str, float]:
    """Rank 0's `rollout/ queue/ train/ perf/` scalars of the step just done."""
    groups = [g for _, batch in consumed for g in batch]
    out = dict(producer.metrics())
    out.update(rollout_metrics(groups))
    stale = staleness_of(consumed)
    out["train/staleness_mean"] = sum(stale) / max(1, len(stale))
    out["train/staleness_max"] = float(max(stale, default=0))
    out["train/version"] = float(consumed[-1][0] + 1)
    out.update(trainer.weight_sync_metrics)
    out.update(clock.scalars())
    out["perf/train_tokens_per_s"] = sum(g.num_tokens for g in groups) / max(
        clock.seconds["perf/time_train"], 1e-9
    )
    gpus = torch.distributed.get_world_size()
    utilisation = mfu(trainer.num_params, out["perf/train_tokens_per_s"], gpus, gpu_peak_flops())
    if utilisation is not None:
        out["perf/mfu"] = utilisation
    return out


def evaluate(producer: Producer | None, trainer: Trainer, version: int) -> dict[str, float]:
    """Held-out accuracy through the engines (rank 0), after giving them the current weights (collective)."""
    sync_weights(producer, trainer, version)
    return producer.evaluate(version) if producer is not None else {}


class ConsumedLog:
    """`run_dir/consumed.jsonl`: which groups (prompt id, producing version) each update trained on.

    An audit trail for staleness and for exactly-once consumption across restarts: on resume, the lines
    of steps after the checkpoint (work that is redone) are dropped first, and a last line cut by a kill
    is dropped with a warning (its update is redone too); a damaged line before it is an error.
    """

    def __init__(self, path: Path, *, keep_through_step: int):
        self.path = path
        if path.exists():
            lines = path.read_text().splitlines()
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    step = json.loads(line)["step"] if line.strip() else None
                except (ValueError, KeyError, TypeError) as e:
                    if number < len(lines):
                        raise ValueError(f"{path}: line {number} is not a consumed-log record ({e})") from None
                    logger.warning("%s: dropping its torn last line %d (%s)", path, number, e)
                    continue
                if step is not None and step <= keep_through_step:
                    kept.append(line)
            path.write_text("".join(ln + "\n" for ln in kept))

    def append(self, step: int, version: int, groups: list[Group]) -> None:
        record = {"step": step, "version": version, "groups": [[g.prompt_id, g.min_version] for g in groups]}
        with naming_write_errors("consumed log append", self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _mean_metrics(per_update: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in per_update for k in d}
    out = {}
    for k in keys:
        vals = [d[k] for d in per_update if k in d]
        out[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    return out


def fill_queue(producer: Producer | None, trainer: Trainer, version: int, clock: StepClock) -> None:
    """sync/fixed: generate with the current weights until the queue holds (K + 1) step batches.

    The first call fills the FIFO with K + 1 batches of the base model; later calls add one batch per
    step (after a crash, only the part of it the journal did not already hold). Collective.
    """
    cfg = trainer.cfg
    P = cfg.train.prompts_per_step
    target = (cfg.staleness.fixed_lag_steps + 1) * P
    while True:
        need = broadcast_from_rank0(min(P, target - producer.depth()) if producer is not None else None)
        if need <= 0:
            return
        with clock("perf/time_sync"):
            sync_weights(producer, trainer, version)  # the engines must generate with the current weights
        with clock("perf/time_generate"):
            groups = producer.generate(need, version) if producer is not None else None
            if cfg.rollout.behavior_logprobs == "trainer":
                trainer.recompute_behavior_logprobs(groups)
            if producer is not None:
                producer.put(groups)


def sync_weights(producer: Producer | None, trainer: Trainer, version: int) -> None:
    """Push the policy to the engines: collective over DP replica 0's ranks; a no-op if they hold `version`."""
    if parallel_state.get_data_parallel_rank() != 0 or trainer.synced_version == version:
        return
    if trainer.weight_sync is None:
        trainer.weight_sync = build_weight_sync(trainer, producer)
    trainer.weight_sync_metrics = trainer.weight_sync.push(version)
    trainer.synced_version = version


def build_weight_sync(trainer: Trainer, producer: Producer | None) -> WeightSync:
    """`rollout.weight_transport`; `auto` picks tensors for in-process engines, NCCL for SGLang on GPU, else disk
    (vLLM servers: disk or tensors, through vLLM's RL routes; they take no NCCL group from this trainer)."""
    r = trainer.cfg.rollout
    transport = r.weight_transport
    if transport == "auto":
        in_process = r.engine == "local" or (r.engine == "vllm" and not r.urls)
        nccl = platform.on_gpu() and r.engine == "sglang"
        transport = "tensors" if in_process else ("distributed" if nccl else "disk")
    if transport == "distributed" and r.engine == "vllm":
        raise ValueError("rollout.weight_transport=distributed: vLLM engines take weights as tensors or from disk")
    farm = producer.farm if producer is not None else None
    kwargs: dict[str, Any] = {"transport": transport}
    if transport == "disk":
        kwargs["disk_dir"] = Path(trainer.cfg.logging.run_dir) / "weights"
    if transport == "distributed" and farm is not None:
        from megatron_m2po.sync.broadcast import DistributedWeightBroadcaster

        broadcaster = DistributedWeightBroadcaster(
            farm.engines,
            master_address=_host_address(),
            master_port=_free_port(),
            backend=platform.dist_backend(),
            device=platform.device(),
        )
        broadcaster.connect(farm.loop)
        kwargs["broadcaster"] = broadcaster
    return WeightSync(trainer.model, trainer.hf_config, farm, **kwargs)


def _host_address() -> str:
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def save(ckpt_root: Path, progress: Progress, trainer: Trainer, producer: Producer | None) -> None:
    """Checkpoint (collective). The queue's commit point goes inside it; once it is on disk, the journal
    segments that the oldest kept checkpoint consumed are freed (`--resume` may fall back to any kept one)."""
    state = {"step": progress.step, "version": progress.version, **trainer.state_dict_extra()}
    if producer is not None:
        state.update(producer.state_dict())
    state = broadcast_from_rank0(state)
    checkpointing.save_checkpoint(
        ckpt_root,
        progress.step,
        trainer.model,
        trainer.optimizer,
        state,
        keep_last=trainer.cfg.checkpoint.keep_last,
    )
    oldest = checkpointing.oldest_trainer_state(ckpt_root) if producer is not None else None
    if oldest is not None:
        producer.queue.gc(oldest["queue"])


def export_hf(trainer: Trainer, out_dir: Path, source_dir: str) -> None:
    """The trained policy as an HF model dir, with the foundation's mapping (collective)."""
    from megatron_m2po.checkpoint.convert import export_hf_dir

    export_hf_dir(trainer.model, trainer.hf_config, out_dir, source_dir=source_dir)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue from the newest checkpoint in run_dir that loads (older ones are tried if the newest "
        "is damaged); --resume=PATH continues from that checkpoint (a dir, or a step_N name in run_dir)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-6")


def run(args: argparse.Namespace) -> int:
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume a.b=c`: an override, not a PATH
        args.overrides, args.resume = [args.resume, *args.overrides], True
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    level, fmt = getattr(logging, cfg.logging.level), f"[rank{rank()}] %(name)s: %(message)s"
    console.setup(getattr(args, "verbose", False), level, fmt)  # --verbose: other libraries' messages too
    try:
        train(cfg, resume=args.resume)
    except ConfigError as e:  # found once the model or the run dir is looked at
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ProducerStopped, WriteError, checkpointing.CheckpointError) as e:  # named; the last checkpoint kept
        logger.error("the run stopped: %s (fix it, then continue with --resume)", e, exc_info=True)
        return 1
    platform.destroy_distributed()
    return 0


def _spawned_children_skip_this_module() -> None:
    """Spawned helpers (the reward pool's workers) re-import the main module before running; this one pulls in
    Megatron and torch (~10 s each on a laptop). They need nothing from it, so point them at the light CLI."""
    main_module = sys.modules.get("__main__")
    if getattr(getattr(main_module, "__spec__", None), "name", None) == "megatron_m2po.train":
        import importlib.util

        main_module.__spec__ = importlib.util.find_spec("megatron_m2po.cli")


def main(argv: list[str] | None = None) -> int:
    _spawned_children_skip_this_module()
    parser = argparse.ArgumentParser(
        prog="python -m megatron_m2po.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    console.add_verbose_argument(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
