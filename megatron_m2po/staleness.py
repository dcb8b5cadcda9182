"""The staleness modes (`staleness.mode`; docs/training.md), in the one place where they differ.

A mode says what a config must hold for it (`config_problems`), the lag it promises (`lag_updates`,
`staleness_bound`), which rule the replay queue applies (`exact_lag`; the rules are in
queue/admission.py), and each step's schedule of generation, weight pushes and joins. train.py calls
the schedule's phases in this order, so the loop shows when work happens:

    start_generation(version)                          once, before the first step
    per step:
        generate_before_step_collective(...)           sync / fixed: generate in line; bounded: nothing
        take_minibatch_collective(update, ...)         per optimizer update; None ends the step (SIGTERM)
        push_weights_after_update_collective(...)      after each update; bounded: every sync_every
        join_generation_after_step_collective(...)     fixed with overlap: queue the batch made beside

Nothing here imports the project (config.py and queue/ import this module): the loop passes in its
producer, trainer, engines, step clock and stop request, and `cfg` is config.Config. A name ending in
`_collective` is a call every trainer rank makes, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal


def split_minibatches(groups: Sequence[Any], groups_per_update: int) -> list[list[Any]]:
    """Consecutive mini-batches of whole prompt groups, one per optimizer update."""
    if len(groups) % groups_per_update:
        raise ValueError(f"{len(groups)} groups do not split into mini-batches of {groups_per_update}")
    return [list(groups[i : i + groups_per_update]) for i in range(0, len(groups), groups_per_update)]


class StalenessMode:
    """One staleness mode: its config rules (class methods, asked by config.py and the queue) and, built
    for a run, its step schedule (the phases)."""

    name: ClassVar[str]
    help: ClassVar[str]
    # True: every group is consumed exactly `lag_updates` after the version that produced it (the queue
    # raises otherwise); False: at most `max_staleness` after (the queue admits and drops by that bound)
    exact_lag: ClassVar[bool]
    uses_fixed_lag_steps: ClassVar[bool] = False  # whether `staleness.fixed_lag_steps` (K) sets the lag

    # ---- what the mode asks of a config
    @classmethod
    def lag_updates(cls, cfg) -> int:
        """The exact lag s in optimizer updates that `exact_lag` promises (0 where there is none)."""
        return 0

    @classmethod
    def staleness_bound(cls, cfg) -> int:
        """The largest staleness (optimizer updates) a consumed group may have."""
        return cls.lag_updates(cfg)

    @classmethod
    def batches_in_line(cls, cfg) -> int:
        """How many step batches the mode keeps queued at a step's start (the queue must hold them)."""
        return 1

    @classmethod
    def config_problems(cls, cfg) -> list[tuple[str, str]]:
        """(key, what is wrong) for each setting this mode cannot run with, most specific first."""
        s = cfg.staleness
        problems = []
        if s.fixed_lag_steps and not cls.uses_fixed_lag_steps:
            users = " or ".join(m.name for m in MODES.values() if m.uses_fixed_lag_steps)
            problems.append(
                ("staleness.fixed_lag_steps", f"only used in {users} mode, but staleness.mode={cls.name}")
            )
        kept = cfg.train.groups_per_step * cls.batches_in_line(cfg)
        if s.queue_capacity < kept:
            problems.append(
                (
                    "staleness.queue_capacity",
                    f"{s.queue_capacity} cannot hold the {kept} groups this mode keeps queued",
                )
            )
        return problems

    # ---- the step schedule of one run
    def __init__(self, cfg, producer, trainer, engines):
        """`producer`: trainer/distribute.SharedProducer; `trainer`: the policy; `engines`: EngineSync."""
        self.cfg, self.producer, self.trainer, self.engines = cfg, producer, trainer, engines

    def start_generation(self, version: int) -> None:
        """Before the first step: start whatever generates between steps (rank 0 only; not a collective)."""

    def generate_before_step_collective(self, version: int, clock, stop) -> None:
        """At a step's start, with the policy at `version`: the generation the step needs first."""

    def take_minibatch_collective(self, update: int, version: int, clock, stop) -> list | None:
        """The prompt groups of the step's `update`-th optimizer update (0-based); None when a SIGTERM ended
        the wait for them (the step ends there)."""
        raise NotImplementedError

    def push_weights_after_update_collective(self, version: int, clock) -> None:
        """After an optimizer update made `version`: the engines' weights, if this mode pushes them now."""

    def join_generation_after_step_collective(self, clock) -> None:
        """After the step's last update: wait for generation that ran beside the updates, and queue it."""


class _InLine(StalenessMode):
    """`sync` / `fixed`: each step first generates with the current weights until the queue holds (K + 1) step
    batches (K = `staleness.fixed_lag_steps`, 0 for sync), then trains on the oldest step batch. The first step
    fills the FIFO with K + 1 batches of the base model, so every batch is K steps old; after a crash, only
    the part of a batch that the journal did not already hold is generated again.

    With K >= 1 and `staleness.overlap_generation`, the step's new batch (the (K + 1)-th, at the current
    weights) is generated while the step trains on the oldest, and queued after the step's last update: the
    same batches at the same versions, consumed in the same order, and the engines are idle again before
    anything else (evaluation, the next push) uses them and before a checkpoint records the queue. Not when
    `rollout.behavior_logprobs=trainer`: its relabel pass runs the trainer's model at the producing version.

    With `rollout.dynamic_sampling` each generation call still returns the groups it was asked for: the rollout
    manager oversamples, drops groups with flat rewards and refills with the engines' weights of that call (no
    push happens before it returns), so a refilled batch is as old as any other and the FIFO keeps its meaning.

    A SIGTERM is honoured at the step's phases: before its generation (none starts) and before its batch is
    taken (the step ends before its first update, so the checkpoint is the previous step's state and the
    generated groups stay in the journal for the resumed run)."""

    exact_lag = True

    @classmethod
    def batches_in_line(cls, cfg) -> int:
        return cfg.staleness.fixed_lag_steps + 1

    def __init__(self, cfg, producer, trainer, engines):
        super().__init__(cfg, producer, trainer, engines)
        self.relabel = trainer.recompute_behavior_logprobs_collective
        if cfg.rollout.behavior_logprobs != "trainer":
            self.relabel = lambda groups: None  # the engines' log-probs are kept
        self.overlap = (
            cfg.staleness.overlap_generation
            and cfg.staleness.fixed_lag_steps >= 1
            and cfg.rollout.behavior_logprobs != "trainer"
        )
        self.groups_beside = 0  # groups of this step generated beside its updates
        self.minibatches: list[list] = []  # this step's, taken at its first update

    def generate_before_step_collective(self, version: int, clock, stop) -> None:
        """Generate with the current weights (pushed to the engines first) until the FIFO holds its K + 1
        batches; with overlap, the newest of them is started beside the updates instead."""
        self.groups_beside = 0
        if stop.requested_collective():
            return
        groups_per_step = self.cfg.train.groups_per_step
        target = self.batches_in_line(self.cfg) * groups_per_step
        if not self.overlap:
            self._fill_collective(version, clock, target)
            return
        # the K older batches in line (only the first step or a resume lacks them)
        self._fill_collective(version, clock, target - groups_per_step)
        self.groups_beside = min(groups_per_step, target - self.producer.queued_collective())
        if self.groups_beside > 0:
            with clock("perf/time_sync"):
                self.engines.push_collective(version)
            self.producer.generate_in_background(self.groups_beside, version)

    def take_minibatch_collective(self, update: int, version: int, clock, stop) -> list | None:
        """The first update takes the step batch (the oldest in the FIFO) and splits it; each update gets its
        `groups_per_update` groups of it."""
        if update == 0:
            if stop.requested_collective():
                return None
            with clock("perf/time_wait"):
                step_batch = self.producer.take_collective(self.cfg.train.groups_per_step)
            self.minibatches = split_minibatches(step_batch, self.cfg.train.groups_per_update)
        return self.minibatches[update]

    def join_generation_after_step_collective(self, clock) -> None:
        if self.groups_beside > 0:
            with clock("perf/time_wait"):
                clock.seconds["perf/time_generate_overlapped"] += self.producer.join_generation_collective()
            self.groups_beside = 0

    def _fill_collective(self, version: int, clock, target: int) -> None:
        """Generate in line with the current weights until `target` groups are queued."""
        groups_per_step = self.cfg.train.groups_per_step
        while (need := min(groups_per_step, target - self.producer.queued_collective())) > 0:
            with clock("perf/time_sync"):
                self.engines.push_collective(version)  # the engines must generate with the current weights
            with clock("perf/time_generate"):
                self.producer.generate_collective(need, version, self.relabel)


class Sync(_InLine):
    name = "sync"
    help = "s=0 on-policy"


class Fixed(_InLine):
    name = "fixed"
    help = "the paper's FIFO of `fixed_lag_steps` batches, s = fixed_lag_steps x updates per step"

    uses_fixed_lag_steps = True

    @classmethod
    def lag_updates(cls, cfg) -> int:
        return cfg.staleness.fixed_lag_steps * cfg.updates_per_step

    @classmethod
    def config_problems(cls, cfg) -> list[tuple[str, str]]:
        problems = []
        if cfg.staleness.fixed_lag_steps == 0:
            problems.append(
                ("staleness.fixed_lag_steps", "must be >= 1 in fixed mode (use staleness.mode=sync for s=0)")
            )
        return problems + super().config_problems(cfg)


class Bounded(StalenessMode):
    """`bounded`: a background thread generates continuously; the queue admits work only if it can be consumed
    within `staleness.max_staleness` updates. Each update takes its own mini-batch; the engines get new
    weights every `rollout.sync_every` updates. With `rollout.dynamic_sampling` the producer gives back the
    reservation of each group it drops and goes on generating within the bound. A SIGTERM ends a wait for a step's first mini-batch at once,
    and a wait for a later one after the stop request's grace period."""

    name = "bounded"
    help = "asynchronous, staleness <= max_staleness"
    exact_lag = False

    @classmethod
    def staleness_bound(cls, cfg) -> int:
        return cfg.staleness.max_staleness

    @classmethod
    def config_problems(cls, cfg) -> list[tuple[str, str]]:
        problems = []
        if cfg.rollout.behavior_logprobs == "trainer":
            keeps = " or ".join(m.name for m in MODES.values() if m.exact_lag)
            problems.append(
                (
                    "rollout.behavior_logprobs",
                    f"`trainer` (recompute with the producing weights) needs staleness.mode {keeps}; "
                    "in bounded mode the producing weights are gone by consumption",
                )
            )
        return problems + super().config_problems(cfg)

    def start_generation(self, version: int) -> None:
        """Rank 0's background producer starts; it runs until the run ends."""
        self.producer.start(version)

    def take_minibatch_collective(self, update: int, version: int, clock, stop) -> list | None:
        with clock("perf/time_wait"):
            return self.producer.take_collective(
                self.cfg.train.groups_per_update, stop.ends_wait(step_begun=update > 0)
            )

    def push_weights_after_update_collective(self, version: int, clock) -> None:
        if version % self.cfg.rollout.sync_every == 0:
            with clock("perf/time_sync"):
                self.engines.push_collective(version)


MODES: dict[str, type[StalenessMode]] = {mode.name: mode for mode in (Sync, Fixed, Bounded)}
ModeName = Literal[tuple(MODES)]  # config.py's `staleness.mode` type: its allowed values


def mode_named(name: str) -> type[StalenessMode]:
    """The mode called `name`; ValueError naming the choices otherwise."""
    if name not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {name!r}")
    return MODES[name]


def staleness_mode(cfg, producer, trainer, engines) -> StalenessMode:
    """`cfg.staleness.mode`'s step schedule for this run."""
    return mode_named(cfg.staleness.mode)(cfg, producer, trainer, engines)
