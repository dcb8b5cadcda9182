"""Random producer / consumer / version / commit / crash schedules against a model of the queue.

Properties: in bounded mode no consumed group is staler than max_staleness, every drop is a
group that really was too stale, and with a trainer that consumes groups_per_update per
version and producers on the current policy nothing is dropped at all; in fixed mode every
batch comes from exactly version - s and is the batch generated K steps earlier; across
crashes (recover from the last commit) no accepted group is lost and none is consumed twice.
"""

from __future__ import annotations

import json
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from queue_helpers import make_group

from megatron_m2po.queue import ReplayQueue

SETTINGS = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class BoundedQueueMachine(RuleBasedStateMachine):
    """Any schedule: lagging engines, partial batches, aborted work, crashes at any point."""

    @initialize(s=st.integers(0, 3), b=st.integers(1, 3))
    def setup(self, s, b):
        self.dir = tempfile.mkdtemp(prefix="m2po-queue-")
        self.kwargs = dict(mode="bounded", max_staleness=s, groups_per_update=b, capacity=12, fsync="never")
        self.s, self.b = s, b
        self.q = ReplayQueue(**self.kwargs, journal_dir=self.dir, segment_bytes=4096)
        self.version = 0
        self.reservations: list[int] = []
        self.accepted: dict[str, int] = {}  # prompt_id -> oldest token version
        self.consumed: set[str] = set()
        self.dropped: set[str] = set()
        self.committed = None
        self.next_id = 0

    def teardown(self):
        if hasattr(self, "q"):
            self.q.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _new_id(self) -> str:
        self.next_id += 1
        return f"p{self.next_id}"

    def _expect_drops(self, before: set[str], returned: set[str]) -> None:
        gone = before - set(self.q.queued_prompt_ids()) - returned
        for pid in gone:
            assert self.version - self.accepted[pid] > self.s, f"{pid} dropped while within the bound"
        self.dropped |= gone

    @rule(lag=st.integers(0, 4), n=st.integers(1, 2))
    def admit(self, lag, n):
        n = min(n, (self.s + 1) * self.b)
        at = max(self.version - lag, 0)
        if self.q.admit(n, timeout=0, version=at):
            self.reservations += [at] * n

    @precondition(lambda self: self.reservations)
    @rule(data=st.data(), span=st.booleans())
    def put_reserved(self, data, span):
        at = self.reservations.pop(data.draw(st.integers(0, len(self.reservations) - 1)))
        versions = [at, at, self.version] if span else at  # a response may span weight updates
        pid = self._new_id()
        assert self.q.put(make_group(pid, versions, response_len=3))
        self.accepted[pid] = at

    @precondition(lambda self: not self.reservations and len(self.q) < 12)
    @rule()
    def put_unreserved(self):
        pid = self._new_id()
        assert self.q.put(make_group(pid, self.version, response_len=3), timeout=0)
        self.accepted[pid] = self.version

    @precondition(lambda self: self.accepted and not self.reservations)
    @rule(data=st.data())
    def put_duplicate(self, data):
        pid = data.draw(st.sampled_from(sorted(self.accepted)))
        assert not self.q.put(make_group(pid, self.version, response_len=3))

    @precondition(lambda self: self.reservations)
    @rule()
    def release(self):
        self.q.release(version=self.reservations.pop())

    @rule(n=st.integers(1, 3))
    def consume(self, n):
        before = set(self.q.queued_prompt_ids())
        batch = self.q.get_batch(n, timeout=0)
        returned = {g.prompt_id for g in batch}
        assert len(batch) in (0, n) and len(returned) == len(batch)
        for g in batch:
            assert self.version - g.min_version <= self.s, "staleness bound violated"
            assert g.prompt_id not in self.consumed, "a group was consumed twice"
        self._expect_drops(before, returned)
        self.consumed |= returned
        if not batch:
            assert len(self.q) < n

    @rule(k=st.integers(1, 2))
    def publish(self, k):
        before = set(self.q.queued_prompt_ids())
        self.version += k
        self.q.publish_version(self.version)
        self._expect_drops(before, set())

    @rule()
    def commit(self):
        state = json.loads(json.dumps(self.q.commit()))  # must survive a JSON checkpoint
        self.committed = (state, self.version, set(self.consumed), set(self.dropped))

    @rule()
    def crash_and_recover(self):
        self.q.close()
        state, self.version, self.consumed, self.dropped = self.committed or (None, 0, set(), set())
        self.consumed, self.dropped = set(self.consumed), set(self.dropped)
        self.q = ReplayQueue.recover(self.dir, state, **self.kwargs, segment_bytes=4096)
        self.reservations = []  # in-flight generation dies with the process
        assert self.q.version == self.version

    @invariant()
    def nothing_lost_nothing_repeated(self):
        if not hasattr(self, "q"):
            return
        queued = self.q.queued_prompt_ids()
        assert len(queued) == len(set(queued))
        assert set(queued) == set(self.accepted) - self.consumed - self.dropped
        versions = [self.accepted[p] for p in queued]
        assert versions == sorted(versions), "not FIFO by version"
        m = self.q.metrics()
        assert m["queue/depth"] == len(queued) and m["queue/inflight"] == len(self.reservations)


class WellBehavedBoundedMachine(RuleBasedStateMachine):
    """Engines on the current policy, a trainer that takes groups_per_update per version: no drop, ever."""

    @initialize(s=st.integers(0, 3), b=st.integers(1, 3))
    def setup(self, s, b):
        self.s, self.b = s, b
        self.q = ReplayQueue("bounded", max_staleness=s, groups_per_update=b, capacity=64)
        self.reservations: list[int] = []
        self.next_id = 0

    @rule(n=st.integers(1, 2))
    def admit(self, n):
        n = min(n, (self.s + 1) * self.b)
        if self.q.admit(n, timeout=0):
            self.reservations += [self.q.version] * n

    @precondition(lambda self: self.reservations)
    @rule(span=st.booleans())
    def generate_oldest(self, span):
        at = self.reservations.pop(0)
        self.next_id += 1
        assert self.q.put(
            make_group(f"w{self.next_id}", [at, self.q.version] if span else at, response_len=2)
        )

    @precondition(lambda self: self.reservations)
    @rule()
    def abort_newest(self):
        self.q.release(version=self.reservations.pop())

    @rule()
    def trainer_step(self):
        batch = self.q.get_batch(self.b, timeout=0)
        if batch:
            assert all(self.q.version - g.min_version <= self.s for g in batch)
            self.q.publish_version(self.q.version + 1)

    @invariant()
    def never_drops(self):
        if hasattr(self, "q"):
            assert self.q.metrics()["queue/dropped"] == 0


class FixedLagMachine(RuleBasedStateMachine):
    """The paper's protocol (FIFO of K batches, U updates per step) with commits and crashes."""

    @initialize(k=st.integers(0, 3), u=st.integers(1, 3), b=st.integers(1, 3))
    def setup(self, k, u, b):
        self.k, self.u, self.b, self.s = k, u, b, k * u
        self.dir = tempfile.mkdtemp(prefix="m2po-fixed-")
        mode = "sync" if self.s == 0 else "fixed"
        self.kwargs = dict(
            mode=mode, fixed_lag_updates=self.s, groups_per_update=b, capacity=(k + 1) * b, fsync="never"
        )
        self.q = ReplayQueue(**self.kwargs, journal_dir=self.dir, segment_bytes=4096)
        self.step = 0
        self.trained_on: dict[int, int] = {}  # step -> step whose batch it trained on (current timeline)
        self.committed = None

    def teardown(self):
        if hasattr(self, "q"):
            self.q.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule()
    def train_step(self):
        already = self.q.accepted_prompt_ids()  # after a restart, this step's batch may be in the journal
        for i in range(self.b):
            pid = f"s{self.step}-{i}"
            if pid not in already:
                assert self.q.put(make_group(pid, self.q.version, response_len=2))
        if self.step >= self.k:  # by step, not len(q): after a restart the journal may hold later batches too
            v = self.q.version
            batch = self.q.get_batch()  # raises StalenessViolation on a wrong lag
            assert [g.prompt_id for g in batch] == [f"s{self.step - self.k}-{i}" for i in range(self.b)]
            assert all(v - g.min_version == min(self.s, v) for g in batch)
            self.q.publish_version(v + self.u)
        self.step += 1

    @rule()
    def commit(self):
        self.committed = (json.loads(json.dumps(self.q.commit())), self.step)

    @rule()
    def crash_and_recover(self):
        self.q.close()
        state, self.step = self.committed or (None, 0)
        self.q = ReplayQueue.recover(self.dir, state, **self.kwargs, segment_bytes=4096)
        assert self.q.version == self.u * max(self.step - self.k, 0)


TestBoundedQueue = BoundedQueueMachine.TestCase
TestBoundedQueue.settings = SETTINGS
TestWellBehavedBounded = WellBehavedBoundedMachine.TestCase
TestWellBehavedBounded.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestFixedLag = FixedLagMachine.TestCase
TestFixedLag.settings = SETTINGS
