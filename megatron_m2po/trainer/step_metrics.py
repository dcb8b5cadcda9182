"""A step's scalars: wall time per phase, staleness, throughput and MFU, and the means over its updates."""

from __future__ import annotations

import contextlib
import time

import torch

from megatron_m2po import platform
from megatron_m2po.metrics import gpu_peak_flops, mfu
from megatron_m2po.trainer.batching import rollout_metrics
from megatron_m2po.trainer.distribute import SharedProducer
from megatron_m2po.trainer.engine_sync import EngineSync
from megatron_m2po.trainer.policy import Policy
from megatron_m2po.types import Group


class StepClock:
    """Wall time per phase of a step (`perf/time_*`), and of the whole step; `perf/time_generate_overlapped` is
    fixed mode's generation beside the updates (not a phase of the step's wall time: it ran during them)."""

    PHASES = (
        "perf/time_generate",
        "perf/time_wait",
        "perf/time_train",
        "perf/time_sync",
        "perf/time_generate_overlapped",
    )

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


def staleness_of(consumed: list[tuple[int, list[Group]]]) -> list[int]:
    """Per group: the version that consumed it - the oldest version that produced any of its tokens."""
    return [version - g.min_version for version, groups in consumed for g in groups]


def step_scalars(
    producer: SharedProducer, trainer: Policy, engines: EngineSync, consumed, clock: StepClock
) -> dict[str, float]:
    """The `rollout/ queue/ train/ perf/` scalars of the step just done (the rollout side's on rank 0 only)."""
    groups = [g for _, batch in consumed for g in batch]
    out = dict(producer.metrics())
    out.update(rollout_metrics(groups))
    stale = staleness_of(consumed)
    out["train/staleness_mean"] = sum(stale) / max(1, len(stale))
    out["train/staleness_max"] = float(max(stale, default=0))
    out["train/version"] = float(consumed[-1][0] + 1)
    out.update(engines.metrics)
    out.update(clock.scalars())
    out["perf/train_tokens_per_s"] = sum(g.num_tokens for g in groups) / max(
        clock.seconds["perf/time_train"], 1e-9
    )
    gpus = torch.distributed.get_world_size()
    utilisation = mfu(
        trainer.num_params, out["perf/train_tokens_per_s"], gpus, gpu_peak_flops(platform.gpu_name())
    )
    if utilisation is not None:
        out["perf/mfu"] = utilisation
    return out


def mean_metrics(per_update: list[dict[str, float]]) -> dict[str, float]:
    """One step's scalars from its updates': the mean, the max for `*_max`."""
    keys = {k for d in per_update for k in d}
    out = {}
    for k in keys:
        vals = [d[k] for d in per_update if k in d]
        out[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    return out
