"""Dynamic sampling (DAPO, arXiv 2503.14476): a prompt group whose rewards do not vary has zero advantage under
group-normalised estimators, so it costs a training slot and carries no signal. `rollout.dynamic_sampling` drops
such groups before they reach the replay queue and has the rollout manager generate others in their place.

A group is kept when the standard deviation of its task rewards (Bessel's, as the GRPO advantage uses) is above
zero and at least `min_std`. Generation is capped: at most `max_oversampling` groups are generated per group
trained, so a run whose prompts have all saturated (every response right, or every one wrong) stops with
`PromptsSaturated` instead of generating forever.

The rollout manager applies it in both of its paths (docs/training.md, "Dynamic sampling"): generating a batch
in line (`generate_kept`: oversample by the observed keep rate, keep the first kept groups in prompt order, and
refill at the same version until the batch is full) and producing in the background (`keeps` per group, and
`window_exhausted` after each: the cap over the groups generated since the last full update's worth was kept).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Awaitable, Callable

from megatron_m2po.rollout.stops import PromptsSaturated
from megatron_m2po.types import Group


def reward_std(group: Group) -> float:
    """Bessel's standard deviation of the group's task rewards (a missing reward counts 0); 0 for one response."""
    rewards = group.rewards
    return statistics.stdev(rewards) if len(rewards) > 1 else 0.0


class DynamicSampling:
    """The keep rule, the oversampling cap, and the counts behind the `rollout/dynamic_sampling_*` metrics.

    Counters are cumulative over the run's process: groups kept, dropped (flat rewards), surplus (kept but
    not needed: an in-line batch oversampled past its size), samples and response tokens generated, tokens
    of dropped and surplus groups, and the in-line refill rounds with their wall time."""

    def __init__(self, *, min_std: float, max_oversampling: float, groups_per_update: int):
        if min_std < 0 or not math.isfinite(min_std):
            raise ValueError(f"dynamic sampling: min_std must be a finite number >= 0, got {min_std}")
        if not max_oversampling >= 1 or not math.isfinite(max_oversampling):
            raise ValueError(f"dynamic sampling: max_oversampling must be >= 1, got {max_oversampling}")
        if groups_per_update < 1:
            raise ValueError(f"dynamic sampling: groups_per_update must be >= 1, got {groups_per_update}")
        self.min_std, self.max_oversampling = min_std, max_oversampling
        self.groups_per_update = groups_per_update
        self.counts = dict.fromkeys(
            ("kept", "dropped", "surplus", "samples", "tokens", "wasted_tokens", "refill_rounds"), 0
        )
        self.refill_seconds = 0.0
        self._window = [0, 0]  # background path: groups generated, kept since the last full update's worth

    def budget(self, num_groups: int) -> int:
        """The most groups generated to keep `num_groups`."""
        return math.floor(self.max_oversampling * num_groups + 1e-9)

    def keeps(self, group: Group) -> bool:
        """Whether `group` carries signal (reward std > 0 and >= min_std); counts it either way."""
        std = reward_std(group)
        kept = std > 0 and std >= self.min_std
        tokens = sum(len(s.response_ids) for s in group.samples)
        self.counts["samples"] += len(group.samples)
        self.counts["tokens"] += tokens
        self.counts["kept" if kept else "dropped"] += 1
        if not kept:
            self.counts["wasted_tokens"] += tokens
        return kept

    def keep_rate(self) -> float:
        """The run's share of kept groups, smoothed as (kept + 1) / (judged + 1) so a few early drops do not
        ask for a huge round (1 before any), and at least 1 / max_oversampling."""
        judged = self.counts["kept"] + self.counts["surplus"] + self.counts["dropped"]
        kept = self.counts["kept"] + self.counts["surplus"]
        return max((kept + 1) / (judged + 1), 1.0 / self.max_oversampling)

    def saturated_message(self, generated: int, kept: int, wanted: int) -> str:
        return (
            f"dynamic sampling generated {generated} prompt groups and kept {kept} of the {wanted} needed: the "
            f"rest had flat rewards (std of the group's rewards 0 or below "
            f"rollout.dynamic_sampling_min_std={self.min_std}); at most "
            f"rollout.dynamic_sampling_max_oversampling={self.max_oversampling:g} groups are generated per group "
            "trained. The prompts have saturated for this policy (every response right, or every one wrong): "
            "use harder or easier data, more responses per prompt, or raise the cap"
        )

    # ---- in line (sync / fixed): a batch of exactly `num_groups` kept groups, all at the engines' version
    async def generate_kept(
        self, num_groups: int, generate: Callable[[int], Awaitable[list[Group]]], clock: Callable[[], float]
    ) -> list[Group]:
        """`num_groups` kept groups, in the order `generate(n)` made them (n new prompts per call). Each round
        asks for the missing count divided by the keep rate (oversampling), within the cap; kept groups past
        `num_groups` are surplus (counted, not returned). Raises `PromptsSaturated` when the cap cannot be met."""
        budget, generated, kept = self.budget(num_groups), 0, []
        first = True
        while len(kept) < num_groups:
            missing = num_groups - len(kept)
            if budget - generated < missing:
                raise PromptsSaturated(self.saturated_message(generated, len(kept), num_groups))
            n = min(budget - generated, max(missing, math.ceil(missing / self.keep_rate() - 1e-9)))
            started = clock()
            groups = await generate(n)
            if not first:
                self.counts["refill_rounds"] += 1
                self.refill_seconds += clock() - started
            first = False
            generated += len(groups)
            kept += [g for g in groups if self.keeps(g)]
        for surplus in kept[num_groups:]:
            self.counts["kept"] -= 1
            self.counts["surplus"] += 1
            self.counts["wasted_tokens"] += sum(len(s.response_ids) for s in surplus.samples)
        return kept[:num_groups]

    # ---- in the background (bounded): one group at a time
    def window_exhausted(self, kept: bool) -> str | None:
        """Record one background group's fate; the stop message once the cap's worth of groups was generated
        since the last full update's worth was kept, without filling it (None otherwise)."""
        self._window[0] += 1
        self._window[1] += kept
        if self._window[1] >= self.groups_per_update:
            self._window = [0, 0]
            return None
        if self._window[0] >= self.budget(self.groups_per_update):
            return self.saturated_message(self._window[0], self._window[1], self.groups_per_update)
        return None

    def metrics(self) -> dict[str, float]:
        """Counts over the run so far; `perf/time_refill` since the previous call (a step's)."""
        c = self.counts
        out = {
            "rollout/dynamic_sampling_kept_groups": float(c["kept"]),
            "rollout/dynamic_sampling_dropped_groups": float(c["dropped"]),
            "rollout/dynamic_sampling_surplus_groups": float(c["surplus"]),
            "rollout/samples_per_kept_group": c["samples"] / max(c["kept"], 1),
            "rollout/dynamic_sampling_wasted_token_fraction": c["wasted_tokens"] / max(c["tokens"], 1),
            "rollout/dynamic_sampling_refill_rounds": float(c["refill_rounds"]),
            "perf/time_refill": self.refill_seconds,
        }
        self.refill_seconds = 0.0
        return out
