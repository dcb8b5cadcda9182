"""The staleness modes (docs/training.md), in the one place where they differ: which mini-batches a step trains
on, and when the engines get the new weights. The loop calls `start`, then per step iterates `minibatches`
and calls `after_update` after each optimizer update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from megatron_m2po.config import Config
from megatron_m2po.trainer.batching import split_minibatches
from megatron_m2po.types import Group

# After a SIGTERM, a wait for the rest of a step that has begun gives the producer this long before the step
# is ended short; a wait at a step's start ends at once (the state is then exactly the previous step's).
SIGTERM_GRACE_S = 10.0


class InLine:
    """`sync` / `fixed`: each step first generates with the current weights until the queue holds (K + 1) step
    batches (K = `staleness.fixed_lag_steps`, 0 for sync), then trains on the oldest step batch. The first step
    fills the FIFO with K + 1 batches of the base model, so every batch is K steps old; after a crash, only
    the part of a batch that the journal did not already hold is generated again.

    With K >= 1 and `staleness.overlap_generation`, the step's new batch (the (K + 1)-th, at the current
    weights) is generated while the step trains on the oldest, and queued after the step's last update: the
    same batches at the same versions, consumed in the same order, and the engines are idle again before
    anything else (evaluation, the next push) uses them and before a checkpoint records the queue. Not when
    `rollout.behavior_logprobs=trainer`: its relabel pass runs the trainer's model at the producing version."""

    def __init__(self, cfg: Config, producer, trainer, engines):
        self.cfg, self.producer, self.trainer, self.engines = cfg, producer, trainer, engines
        self.relabel = trainer.recompute_behavior_logprobs
        if cfg.rollout.behavior_logprobs != "trainer":
            self.relabel = lambda groups: None  # the engines' log-probs are kept
        self.overlap = (
            cfg.staleness.overlap_generation
            and cfg.staleness.fixed_lag_steps >= 1
            and cfg.rollout.behavior_logprobs != "trainer"
        )

    def start(self, version: int) -> None:
        """Nothing runs between steps."""

    def minibatches(
        self, version: int, clock, stop_requested: Callable[[float], bool]
    ) -> Iterator[list[Group]]:
        """The step's `updates_per_step` mini-batches (collective)."""
        groups_per_step = self.cfg.train.groups_per_step
        target = (self.cfg.staleness.fixed_lag_steps + 1) * groups_per_step
        background = 0
        if self.overlap:  # the K older batches in line (only the first step or a resume lacks them)
            self._fill(version, clock, target - groups_per_step)
            background = min(groups_per_step, target - self.producer.queued())
            if background > 0:
                with clock("perf/time_sync"):
                    self.engines.push(version)
                self.producer.generate_in_background(background, version)
        else:
            self._fill(version, clock, target)
        with clock("perf/time_wait"):
            step_batch = self.producer.take(groups_per_step)
        yield from split_minibatches(step_batch, self.cfg.train.groups_per_update)
        if background > 0:
            with clock("perf/time_wait"):
                clock.seconds["perf/time_generate_overlapped"] += self.producer.join_generation()

    def after_update(self, version: int, clock) -> None:
        """The engines get the new weights before the next generation."""

    def _fill(self, version: int, clock, target: int) -> None:
        """Generate in line with the current weights until `target` groups are queued."""
        groups_per_step = self.cfg.train.groups_per_step
        while (need := min(groups_per_step, target - self.producer.queued())) > 0:
            with clock("perf/time_sync"):
                self.engines.push(version)  # the engines must generate with the current weights
            with clock("perf/time_generate"):
                self.producer.generate(need, version, self.relabel)


class Background:
    """`bounded`: a background thread generates continuously; the queue admits work only if it can be consumed
    within `staleness.max_staleness` updates. Each update takes its own mini-batch; the engines get new
    weights every `rollout.sync_every` updates."""

    def __init__(self, cfg: Config, producer, trainer, engines):
        self.cfg, self.producer, self.engines = cfg, producer, engines

    def start(self, version: int) -> None:
        self.producer.start(version)

    def minibatches(
        self, version: int, clock, stop_requested: Callable[[float], bool]
    ) -> Iterator[list[Group]]:
        """Up to `updates_per_step` mini-batches (collective); fewer when a SIGTERM ends the wait for one."""
        for index in range(self.cfg.updates_per_step):
            grace = SIGTERM_GRACE_S if index else 0.0
            with clock("perf/time_wait"):
                groups = self.producer.take(self.cfg.train.groups_per_update, partial(stop_requested, grace))
            if groups is None:  # SIGTERM while waiting: this step ends here
                return
            yield groups

    def after_update(self, version: int, clock) -> None:
        if version % self.cfg.rollout.sync_every == 0:
            with clock("perf/time_sync"):
                self.engines.push(version)


def staleness_mode(cfg: Config, producer, trainer, engines) -> InLine | Background:
    """`staleness.mode`'s data and weight schedule."""
    return (Background if cfg.staleness.mode == "bounded" else InLine)(cfg, producer, trainer, engines)
