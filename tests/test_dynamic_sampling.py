"""Dynamic sampling: the keep rule against the GRPO advantage, the in-line refill (exact batch, order, cap), the
background window's stop, and the bounded queue with dropped groups (staleness bound, nothing lost or repeated
across crashes, dropped groups never queued)."""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from queue_helpers import make_group

from megatron_m2po.algorithms import compute_advantages
from megatron_m2po.queue import ReplayQueue
from megatron_m2po.queue.codec import decode_group
from megatron_m2po.queue.journal import scan_journal
from megatron_m2po.rollout.dynamic_sampling import DynamicSampling, reward_std
from megatron_m2po.rollout.stops import ProducerStopped, PromptsSaturated


def scored(prompt_id: str, rewards: list[float | None], version: int = 0):
    group = make_group(prompt_id, version, n_samples=len(rewards), response_len=3)
    for sample, reward in zip(group.samples, rewards):
        sample.reward = reward
    return group


def sampling(min_std=0.0, max_oversampling=4.0, groups_per_update=2) -> DynamicSampling:
    return DynamicSampling(
        min_std=min_std, max_oversampling=max_oversampling, groups_per_update=groups_per_update
    )


# ---------------------------------------------------------------------------------------------- the keep rule

REWARDS = st.lists(st.sampled_from([0.0, 0.1, 1.0]), min_size=2, max_size=8)


@given(REWARDS)
@example([1.0, 1.0])  # all right: flat
@example([0.0, 0.0, 0.0, 0.0])  # all wrong: flat
@example([0.1, 0.0])  # a format reward against a wrong answer: varied
def test_a_group_is_kept_exactly_when_its_grpo_advantages_are_not_all_zero(rewards):
    group = scored("p", rewards)
    advantages = compute_advantages(torch.tensor(rewards), ["p"] * len(rewards), estimator="grpo")
    assert sampling().keeps(group) == bool((advantages != 0).any())
    assert reward_std(group) == pytest.approx(
        torch.tensor(rewards, dtype=torch.float64).std().item(), abs=1e-12
    )


def test_min_std_drops_groups_that_vary_too_little_and_missing_rewards_count_zero():
    rule = sampling(min_std=0.5)
    assert not rule.keeps(scored("a", [0.1, 0.0, 0.0, 0.0]))  # std 0.05
    assert rule.keeps(scored("b", [1.0, 0.0]))  # std 0.707
    assert not rule.keeps(scored("c", [None, 0.0]))  # a failed reward is a 0: flat
    assert not sampling().keeps(scored("d", [1.0]))  # one response never varies
    assert rule.counts == {**rule.counts, "kept": 1, "dropped": 2, "samples": 8}


@pytest.mark.parametrize(
    "kwargs",
    [{"min_std": -0.1}, {"max_oversampling": 0.5}, {"max_oversampling": math.inf}, {"groups_per_update": 0}],
)
def test_bad_settings_are_refused_by_name(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        sampling(**kwargs)


def test_prompts_saturated_is_a_producer_stop():
    """The loop's stop handling (every rank raises, exit status 1 with the reason) covers it."""
    assert issubclass(PromptsSaturated, ProducerStopped)


# ----------------------------------------------------------------------------------- in line (sync / fixed)


def run_in_line(keeps: list[bool], num_groups: int, cap: float, rule: DynamicSampling | None = None):
    """`generate_kept` over groups whose fates are `keeps`, in order; returns (result or error, asked sizes)."""
    rule = rule or sampling(max_oversampling=cap)
    made, asked = iter(range(len(keeps))), []

    async def generate(n: int):
        asked.append(n)
        groups = []
        for _ in range(n):
            i = next(made)  # never asked for more than the cap allows (StopIteration would fail the test)
            groups.append(scored(f"p{i}", [0.0, 1.0] if keeps[i] else [1.0, 1.0]))
        return groups

    try:
        return asyncio.run(rule.generate_kept(num_groups, generate, lambda: 0.0)), asked, rule
    except PromptsSaturated as e:
        return e, asked, rule


@given(
    num_groups=st.integers(1, 6),
    cap=st.sampled_from([1.0, 1.5, 2.0, 4.0]),
    keeps=st.lists(st.booleans(), min_size=24, max_size=24),
)
@example(num_groups=3, cap=2.0, keeps=[False] * 24)  # saturated: nothing kept
@example(num_groups=2, cap=1.0, keeps=[True] * 24)  # no room to oversample, all kept
@example(num_groups=2, cap=1.0, keeps=[True, False] + [True] * 22)  # one drop with no room: stop
@example(
    num_groups=4, cap=4.0, keeps=[False] * 12 + [True] * 4 + [False] * 8
)  # filled by the last of the cap
@settings(max_examples=200, deadline=None)
def test_in_line_batch_is_the_first_kept_groups_in_order_within_the_cap(num_groups, cap, keeps):
    result, asked, rule = run_in_line(keeps, num_groups, cap)
    budget = math.floor(cap * num_groups + 1e-9)
    generated = sum(asked)
    assert generated <= budget
    kept_in_budget = [f"p{i}" for i in range(budget) if keeps[i]]
    if len(kept_in_budget) < num_groups:
        assert isinstance(result, PromptsSaturated), "a batch the cap cannot fill must stop the run"
        assert f"dynamic_sampling_max_oversampling={cap:g}" in str(result)
        return
    assert not isinstance(result, Exception), result
    ids = [g.prompt_id for g in result]
    assert (
        ids == [f"p{i}" for i in range(generated) if keeps[i]][:num_groups]
    )  # no loss, no duplicates, order
    c = rule.counts
    assert c["kept"] == num_groups and c["kept"] + c["surplus"] + c["dropped"] == generated
    assert c["refill_rounds"] == len(asked) - 1
    assert all(n >= 1 for n in asked)


def test_a_known_keep_rate_oversamples_the_first_round():
    """After half the groups were dropped, a batch of 4 asks for about 8 at once instead of 4 and a refill."""
    rule = sampling(max_oversampling=4.0)
    for i in range(20):
        rule.keeps(scored(f"w{i}", [0.0, 1.0] if i % 2 else [1.0, 1.0]))
    _, asked, _ = run_in_line([True, False] * 12, 4, 4.0, rule)
    assert asked == [8]


# ------------------------------------------------------------------------------------------ background (bounded)


@given(
    groups_per_update=st.integers(1, 4),
    cap=st.sampled_from([1.0, 2.0, 3.0]),
    keeps=st.lists(st.booleans(), max_size=40),
)
@example(groups_per_update=2, cap=2.0, keeps=[False] * 4)  # stops at the 4th group
@example(
    groups_per_update=2, cap=2.0, keeps=[True, False, False, True, False, False, False]
)  # window restarts
@settings(max_examples=200, deadline=None)
def test_background_window_stops_after_the_cap_without_a_full_update(groups_per_update, cap, keeps):
    rule = sampling(max_oversampling=cap, groups_per_update=groups_per_update)
    budget = math.floor(cap * groups_per_update + 1e-9)
    generated = kept = 0
    for keep in keeps:
        generated, kept = generated + 1, kept + keep
        message = rule.window_exhausted(keep)
        if kept >= groups_per_update:
            generated = kept = 0
            assert message is None
        elif generated >= budget:
            assert message is not None and "kept" in message
            return
        else:
            assert message is None


class BoundedQueueWithDroppingMachine(RuleBasedStateMachine):
    """The background producer's protocol with dynamic sampling on the real queue: admit, generate, then put a
    kept group or release the reservation of a dropped one; engines may lag; crashes recover from the last
    commit. Properties: consumed groups are within the staleness bound, consumed at most once, never a dropped
    one; every kept group is queued, consumed or dropped as too stale (never lost); the journal holds no dropped
    group."""

    @initialize(s=st.integers(0, 2), b=st.integers(1, 3))
    def setup(self, s, b):
        self.dir = tempfile.mkdtemp(prefix="m2po-ds-")
        self.kwargs = dict(mode="bounded", max_staleness=s, groups_per_update=b, capacity=8, fsync="never")
        self.s = s
        self.q = ReplayQueue(**self.kwargs, journal_dir=self.dir, segment_bytes=4096)
        self.rule = sampling(groups_per_update=b)
        self.version, self.next_id, self.committed = 0, 0, None
        self.kept: dict[str, int] = {}
        self.filtered: set[str] = set()
        self.consumed: set[str] = set()
        self.too_stale: set[str] = set()

    def teardown(self):
        if hasattr(self, "q"):
            self.q.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _stale_drops(self, before: set[str], returned: set[str]) -> None:
        gone = before - set(self.q.queued_prompt_ids()) - returned
        assert all(self.version - self.kept[p] > self.s for p in gone), "dropped while within the bound"
        self.too_stale |= gone

    @rule(lag=st.integers(0, 3), flat=st.booleans())
    def produce(self, lag, flat):
        at = max(self.version - lag, 0)
        if not self.q.admit(1, timeout=0, version=at):
            return
        self.next_id += 1
        group = scored(f"p{self.next_id}", [1.0, 1.0] if flat else [0.0, 1.0], version=at)
        if self.rule.keeps(group):
            assert self.q.put(group)
            self.kept[group.prompt_id] = at
        else:
            self.q.release(version=at)
            self.filtered.add(group.prompt_id)

    @rule(n=st.integers(1, 3))
    def consume(self, n):
        before = set(self.q.queued_prompt_ids())
        batch = self.q.get_batch(n, timeout=0)
        returned = {g.prompt_id for g in batch}
        for g in batch:
            assert self.version - g.min_version <= self.s, "staleness bound violated"
            assert g.prompt_id not in self.consumed and g.prompt_id not in self.filtered
            assert reward_std(g) > 0
        self._stale_drops(before, returned)
        self.consumed |= returned

    @rule()
    def publish(self):
        before = set(self.q.queued_prompt_ids())
        self.version += 1
        self.q.publish_version(self.version)
        self._stale_drops(before, set())

    @rule()
    def commit(self):
        self.committed = (self.q.commit(), self.version, set(self.consumed), set(self.too_stale))

    @precondition(lambda self: self.committed is not None)
    @rule()
    def crash_and_recover(self):
        self.q.close()
        state, self.version, consumed, too_stale = self.committed
        self.consumed, self.too_stale = set(consumed), set(too_stale)
        self.q = ReplayQueue.recover(self.dir, state, **self.kwargs, segment_bytes=4096)

    @invariant()
    def kept_groups_are_never_lost_and_dropped_ones_never_queued(self):
        if not hasattr(self, "q"):
            return
        queued = self.q.queued_prompt_ids()
        assert len(queued) == len(set(queued))
        assert set(queued) == set(self.kept) - self.consumed - self.too_stale
        journaled = {decode_group(r.payload).prompt_id for r in scan_journal(self.dir).records}
        assert not journaled & self.filtered


BoundedQueueWithDroppingMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_bounded_queue_with_dropping = BoundedQueueWithDroppingMachine.TestCase
