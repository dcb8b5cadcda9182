"""When may a producer start a prompt, and which version must a fixed-lag batch come from.

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

from collections.abc import Mapping


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
