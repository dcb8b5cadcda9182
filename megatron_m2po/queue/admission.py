"""The queue's admission rule per staleness mode: when may a producer start a prompt, which queued groups got
too stale, and which version a consumed group must come from. `admission_rule` picks the rule from what the
mode declares (`megatron_m2po.staleness`); the queue asks only the rule.

The bounded rule generalises AReaL's staleness manager (capacity =
(max_staleness + version + 1) * batch - (accepted + running)) to a queue that is FIFO by
version and to producers whose engines lag the trainer:

Let v be the trainer's version, c the groups it already consumed at v, B the groups it
consumes per version, S the staleness bound. Pending work (queued groups by their oldest
token's version, reserved groups by the version they will be generated with) is consumed
oldest version first, so the last pending group of version <= u sits at position
cum(u) = #{pending with version <= u} and is consumed at version
v + floor((c + cum(u) - 1) / B). Its staleness is <= S exactly when

    c + cum(u) <= (S + u - v + 1) * B        (the capacity of level u)

Starting n groups at version u0 adds n to cum(u) for every u >= u0. We admit them when
level u0 stays within its capacity and no newer level that is within its capacity now is
pushed over it. (A level already over is not protected: its groups will be dropped at
consumption anyway, and protecting it would stall the producer.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from megatron_m2po.staleness import mode_named


class StalenessViolation(RuntimeError):
    """Fixed/sync mode: the oldest batch was not produced by exactly version - fixed_lag_updates."""


def level_capacity(level: int, *, version: int, max_staleness: int, groups_per_update: int) -> int:
    """How many groups may be consumed (counting from version `version`) before level `level` is too stale."""
    return (max_staleness + level - version + 1) * groups_per_update


def bounded_admissible(
    num_groups: int,
    at_version: int,
    *,
    version: int,
    consumed_at_version: int,
    pending: Mapping[int, int],
    max_staleness: int,
    groups_per_update: int,
) -> bool:
    """True when `num_groups` started at policy version `at_version` can all be consumed within the bound."""
    if version - at_version > max_staleness:
        return False

    def cap(level: int) -> int:
        return level_capacity(
            level, version=version, max_staleness=max_staleness, groups_per_update=groups_per_update
        )

    cum = consumed_at_version + sum(count for level, count in pending.items() if level <= at_version)
    if cum + num_groups > cap(at_version):
        return False
    for level in sorted(lv for lv in pending if lv > at_version):
        cum += pending[level]
        if cum <= cap(level) < cum + num_groups:
            return False
    return True


def expected_fixed_version(version: int, fixed_lag_updates: int) -> int:
    """The producing version of the batch consumed at `version` under a fixed lag.

    Clamped at 0: in the paper's protocol the first steps train on base-model rollouts
    (the FIFO of K batches was filled by version 0), so the lag grows to `fixed_lag_updates`.
    """
    return max(version - fixed_lag_updates, 0)


class AdmissionRule:
    """What the queue asks of its mode's rule. These defaults admit whatever fits the capacity, drop nothing
    and accept every consumed group; each rule overrides what its mode restricts."""

    def check_request(self, num_groups: int) -> None:
        """ValueError when `num_groups` started together could never be admitted."""

    def admit(
        self,
        num_groups: int,
        at_version: int,
        *,
        version: int,
        consumed_at_version: int,
        pending: Mapping[int, int],
    ) -> bool | None:
        """Whether `num_groups` started at `at_version` may start now (the trainer is at `version`, has consumed
        `consumed_at_version` groups there, and `pending` counts queued + reserved groups by version); None
        when they never may."""
        return True

    def oldest_fresh(self, version: int) -> int | None:
        """The oldest producing version a queued group may have at trainer version `version` (older ones are
        dropped); None: nothing is dropped."""
        return None

    def check_consumed(self, batch: Iterable[tuple[str, int, int]], version: int) -> None:
        """Raise before a batch of (prompt id, oldest, newest producing version) that breaks the rule is consumed
        at `version`."""


class BoundedStaleness(AdmissionRule):
    """`bounded`: admit work only if it can be consumed within `max_staleness` updates; drop what got staler."""

    def __init__(self, *, max_staleness: int, groups_per_update: int):
        self.max_staleness, self.groups_per_update = max_staleness, groups_per_update

    def check_request(self, num_groups: int) -> None:
        bound = (self.max_staleness + 1) * self.groups_per_update
        if num_groups > bound:
            raise ValueError(
                f"admit: num_groups={num_groups} can never fit within max_staleness: at most "
                f"(max_staleness + 1) * groups_per_update = {bound}"
            )

    def admit(self, num_groups, at_version, *, version, consumed_at_version, pending) -> bool | None:
        if version - at_version > self.max_staleness:  # too far behind: never
            return None
        return bounded_admissible(
            num_groups,
            at_version,
            version=version,
            consumed_at_version=consumed_at_version,
            pending=pending,
            max_staleness=self.max_staleness,
            groups_per_update=self.groups_per_update,
        )

    def oldest_fresh(self, version: int) -> int | None:
        return version - self.max_staleness


class ExactLag(AdmissionRule):
    """`sync` / `fixed`: capacity alone limits admission, nothing is dropped, and every group consumed at version
    v must come from exactly `max(v - fixed_lag_updates, 0)`."""

    def __init__(self, mode: str, *, fixed_lag_updates: int):
        self.mode, self.fixed_lag_updates = mode, fixed_lag_updates

    def check_consumed(self, batch: Iterable[tuple[str, int, int]], version: int) -> None:
        expected = expected_fixed_version(version, self.fixed_lag_updates)
        for prompt_id, low, high in batch:
            if low != expected or high != expected:
                raise StalenessViolation(
                    f"{self.mode} mode: group {prompt_id!r} consumed at version {version} was "
                    f"produced by versions {low}..{high}, expected exactly {expected} "
                    f"(fixed_lag_updates={self.fixed_lag_updates}); nothing was consumed"
                )


def admission_rule(
    mode: str, *, max_staleness: int, groups_per_update: int, fixed_lag_updates: int
) -> AdmissionRule:
    """The rule of the staleness mode called `mode` (ValueError for an unknown name or a lag it cannot have)."""
    declared = mode_named(mode)
    if not declared.exact_lag:
        return BoundedStaleness(max_staleness=max_staleness, groups_per_update=groups_per_update)
    if fixed_lag_updates and not declared.uses_fixed_lag_steps:
        raise ValueError(
            f"mode={mode!r} means fixed_lag_updates=0, got fixed_lag_updates={fixed_lag_updates}"
        )
    return ExactLag(mode, fixed_lag_updates=fixed_lag_updates)
