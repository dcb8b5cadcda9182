"""ReplayQueue behaviour: admission, dropping, fixed lag, batching, back-pressure, threads, asyncio."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from queue_helpers import make_group

from megatron_m2po.queue import QueueClosed, QueueFull, ReplayQueue, StalenessViolation
from megatron_m2po.queue.admission import bounded_admissible
from megatron_m2po.types import Group


@settings(max_examples=200, deadline=None)
@given(
    s=st.integers(0, 6),
    b=st.integers(1, 8),
    consumed=st.integers(0, 8),
    queued=st.integers(0, 40),
    reserved=st.integers(0, 40),
    n=st.integers(1, 8),
    version=st.integers(0, 50),
)
def test_admission_equals_areal_rule_when_everything_is_on_policy(
    s, b, consumed, queued, reserved, n, version
):
    """AReaL: admit while (S + v + 1) * B >= accepted_total + running + n, with accepted_total = v*B + consumed + queued."""
    pending = {version: queued + reserved} if queued + reserved else {}
    ours = bounded_admissible(
        n,
        version,
        version=version,
        consumed_at_version=consumed,
        pending=pending,
        max_staleness=s,
        groups_per_update=b,
    )
    areal = (s + version + 1) * b >= version * b + consumed + queued + reserved + n
    assert ours == areal


def test_admit_waits_until_the_trainer_moves():
    q = ReplayQueue("bounded", max_staleness=1, groups_per_update=2)
    assert all(q.admit(timeout=0) for _ in range(4))  # (S + 1) * B = 4 slots at version 0
    assert not q.admit(timeout=0.01)
    for i in range(4):
        assert q.put(make_group(f"p{i}", 0))
    assert [g.prompt_id for g in q.get_batch()] == ["p0", "p1"]
    assert not q.admit(timeout=0)  # consumed at version 0 still counts until the update is published
    q.publish_version(1)
    assert q.admit(timeout=0) and q.admit(timeout=0) and not q.admit(timeout=0)
    m = q.metrics()
    assert m["queue/admitted"] == 6 and m["queue/admit_waits"] == 3 and m["queue/inflight"] == 2


def test_admit_for_a_lagging_engine():
    q = ReplayQueue("bounded", max_staleness=2, groups_per_update=1)
    q.publish_version(5)
    assert not q.admit(timeout=5, version=2)  # 3 versions behind: can never be consumed in bound, no wait
    assert q.admit(timeout=0, version=3)  # consumed now at the earliest: staleness 2
    assert not q.admit(timeout=0, version=3)
    assert q.admit(timeout=0, version=5) and q.admit(timeout=0, version=5)
    # a new version-4 group would cut ahead of the version-5 work and push it past its bound
    assert not q.admit(timeout=0, version=4)
    with pytest.raises(ValueError, match="can never fit"):
        q.admit(4)


def test_too_stale_groups_are_dropped_counted_and_logged(caplog):
    q = ReplayQueue("bounded", max_staleness=2)
    for i, v in enumerate([0, 1, 3]):
        q.put(make_group(f"g{i}", v))
    with caplog.at_level(logging.WARNING):
        q.publish_version(3)  # g0 now 3 versions old
    assert "dropped group 'g0': staleness 3 > max_staleness 2" in caplog.text
    assert q.queued_prompt_ids() == ["g1", "g2"]
    assert [g.prompt_id for g in q.get_batch(2)] == ["g1", "g2"]
    m = q.metrics()
    assert m["queue/dropped"] == 1 and m["queue/consumed"] == 2
    assert m["queue/staleness_max"] == 2 and m["queue/staleness_mean"] == pytest.approx(1.0)
    assert m["queue/staleness_frac/2-3"] == pytest.approx(0.5) and m[
        "queue/staleness_frac/0"
    ] == pytest.approx(0.5)
    assert not q.put(make_group("g0", 3))  # a dropped prompt was still accepted once


def test_staleness_is_per_token_from_the_oldest_token():
    q = ReplayQueue("bounded", max_staleness=3)
    q.put(make_group("span", [1, 1, 2, 2, 2, 3]))  # a response that spans two weight updates
    q.publish_version(4)
    assert len(q.get_batch()) == 1
    m = q.metrics()
    assert m["queue/staleness_max"] == 3
    assert m["queue/staleness_mean"] == pytest.approx((3 * 2 + 2 * 3 + 1 * 1) / 6)
    q.publish_version(5)
    q.put(make_group("old", [1, 5]))  # its oldest token decides: 4 > 3
    assert q.get_batch(timeout=0) == [] and q.metrics()["queue/dropped"] == 1


def test_fifo_by_version_not_by_arrival():
    q = ReplayQueue("bounded", max_staleness=10)
    for pid, v in [("new", 2), ("old", 0), ("mid", 1), ("old2", 0)]:
        q.put(make_group(pid, v))
    assert [g.prompt_id for g in q.get_batch(4)] == ["old", "old2", "mid", "new"]


def test_fixed_mode_checks_the_exact_lag():
    q = ReplayQueue("fixed", fixed_lag_updates=2, groups_per_update=2)
    q.put(make_group("a", 0))
    q.put(make_group("b", 1))
    q.publish_version(2)
    with pytest.raises(
        StalenessViolation,
        match="'b' consumed at version 2 was produced by versions 1..1, expected exactly 0",
    ):
        q.get_batch()
    assert q.queued_prompt_ids() == ["a", "b"]  # nothing consumed by the failed call
    q2 = ReplayQueue("sync")
    q2.put(make_group("c", [0, 1]))  # a sync batch must come from one version only
    with pytest.raises(StalenessViolation, match="versions 0..1"):
        q2.get_batch()


def test_paper_fifo_of_k_batches_gives_exact_lag():
    """The paper's protocol: a FIFO of K generated batches, U updates per step, s = K * U."""
    k, updates, b = 3, 2, 4
    s = k * updates
    q = ReplayQueue("fixed", fixed_lag_updates=s, groups_per_update=b, capacity=(k + 1) * b)
    consumed_lags = []
    for step in range(12):
        for i in range(b):  # generate with the current policy
            assert q.put(make_group(f"s{step}-{i}", q.version))
        if len(q) > k * b:  # the oldest batch leaves once the queue holds more than K
            batch = q.get_batch()
            consumed_lags.append(q.version - batch[0].min_version)
            q.publish_version(q.version + updates)
    assert consumed_lags == [0, 2, 4] + [s] * 6  # warm-up on base-model rollouts, then exactly s


def test_batches_by_tokens():
    q = ReplayQueue("bounded", max_staleness=5)
    sizes = {"a": 3, "b": 4, "c": 2, "d": 9}
    for pid, n in sizes.items():
        q.put(make_group(pid, 0, n_samples=1, prompt_len=1, response_len=n - 1))
    assert [g.prompt_id for g in q.get_batch(max_tokens=8)] == ["a", "b"]  # c would not fit
    assert q.get_batch(max_tokens=20, timeout=0.01) == []  # c + d = 11 < 20 and more may come: wait
    assert [g.prompt_id for g in q.get_batch(max_tokens=11)] == ["c", "d"]
    q.put(make_group("huge", 0, n_samples=1, prompt_len=1, response_len=99))
    assert [g.prompt_id for g in q.get_batch(max_tokens=10)] == ["huge"]  # alone rather than never
    for pid in "xyz":
        q.put(make_group(pid, 0, n_samples=1, prompt_len=1, response_len=1))
    assert [g.prompt_id for g in q.get_batch(2, max_tokens=100)] == ["x", "y"]


def test_capacity_back_pressure():
    q = ReplayQueue("bounded", max_staleness=100, capacity=2)
    q.put(make_group("a", 0))
    assert q.admit(timeout=0)
    assert not q.admit(timeout=0)  # 1 queued + 1 reserved = capacity
    assert q.put(make_group("b", 0))  # reserved work never blocks
    q2 = ReplayQueue("fixed", capacity=1)
    q2.put(make_group("x", 0))
    with pytest.raises(QueueFull):
        q2.put(make_group("y", 0), timeout=0.01)

    done = threading.Event()

    def consumer():
        time.sleep(0.05)
        q2.get_batch()
        done.set()

    t = threading.Thread(target=consumer)
    t.start()
    assert q2.put(make_group("y", 0), timeout=5)  # unblocked by the consumer
    t.join()
    assert done.is_set() and q2.queued_prompt_ids() == ["y"]


def test_duplicates_and_releases():
    q = ReplayQueue("bounded", max_staleness=0, groups_per_update=2)
    assert q.admit(2, timeout=0)
    assert q.put(make_group("a", 0))
    assert not q.put(make_group("a", 0))  # duplicate: refused, and its reservation is used up
    assert q.metrics()["queue/inflight"] == 0 and q.metrics()["queue/duplicates"] == 1
    assert q.admit(timeout=0)
    q.release()
    with pytest.raises(ValueError, match="only 0 groups are reserved"):
        q.release()
    assert q.admit(timeout=0)
    assert q.accepted_prompt_ids() == {"a"}


def test_close_wakes_waiters():
    q = ReplayQueue("bounded", max_staleness=0)
    results = {}

    def consumer():
        try:
            q.get_batch()
        except QueueClosed:
            results["get"] = "closed"

    assert q.admit(timeout=0)
    threads = [
        threading.Thread(target=consumer),
        threading.Thread(target=lambda: results.update(admit=q.admit())),
    ]
    for t in threads:
        t.start()
    time.sleep(0.05)
    q.close()
    for t in threads:
        t.join(timeout=5)
    assert results == {"get": "closed", "admit": False}
    with pytest.raises(QueueClosed):
        q.put(make_group("late", 0))


def test_admit_async_waits_without_blocking_the_loop_and_is_cancel_safe():
    q = ReplayQueue("bounded", max_staleness=0, groups_per_update=1)

    async def main():
        assert await q.admit_async()
        ticks = 0
        waiter = asyncio.create_task(q.admit_async(timeout=5))
        threading.Timer(0.1, lambda: (q.put(make_group("a", 0)), q.get_batch(), q.publish_version(1))).start()
        while not waiter.done():
            ticks += 1  # the loop keeps running while admit waits
            await asyncio.sleep(0.01)
        assert waiter.result() and ticks >= 5
        cancelled = asyncio.create_task(q.admit_async())
        await asyncio.sleep(0.02)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not await q.admit_async(timeout=0.01)
        assert await q.put_async(make_group("b", 1))

    asyncio.run(main())
    assert q.metrics()["queue/inflight"] == 0  # the cancelled admit reserved nothing


@pytest.mark.parametrize("producer_kind", ["thread", "asyncio"])
def test_producer_and_consumer_threads_lose_nothing(tmp_path, producer_kind):
    """A real producer thread (admit/generate/put, sometimes aborting) against a trainer thread.

    "asyncio": the producer is an event loop in a background thread, as the rollout manager runs.
    """
    s, b, steps = 2, 3, 40
    q = ReplayQueue("bounded", max_staleness=s, groups_per_update=b, capacity=32, journal_dir=tmp_path / "j")
    produced, consumed, worst = [], [], [0]
    stop = threading.Event()

    def make_or_abort(i: int, v: int) -> Group | None:
        if i % 17 == 5:
            q.release(version=v)  # an aborted request
            return None
        return make_group(f"p{i}", v, response_len=16)

    def producer():
        i = 0
        while not stop.is_set():
            if not q.admit(timeout=0.05):
                continue
            v = q.version
            time.sleep(0.001 * (i % 3))  # generation time
            if (group := make_or_abort(i, v)) is not None:
                assert q.put(group)
                produced.append(group.prompt_id)
            i += 1

    async def async_producer():
        async def one(i: int, v: int):
            await asyncio.sleep(0.001 * (i % 3))
            if (group := make_or_abort(i, v)) is not None:
                assert await q.put_async(group)
                produced.append(group.prompt_id)

        i, tasks = 0, set()
        while not stop.is_set():
            if not await q.admit_async(timeout=0.05):
                continue
            task = asyncio.create_task(one(i, q.version))  # several groups in flight at once
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)

    def trainer():
        for step in range(steps):
            batch = q.get_batch(timeout=10)
            assert len(batch) == b
            for g in batch:
                worst[0] = max(worst[0], q.version - g.min_version)
            consumed.extend(g.prompt_id for g in batch)
            time.sleep(0.002)  # the optimizer step
            q.publish_version(step + 1)

    target = producer if producer_kind == "thread" else lambda: asyncio.run(async_producer())
    threads = [threading.Thread(target=target), threading.Thread(target=trainer)]
    for t in threads:
        t.start()
    threads[1].join(timeout=60)
    stop.set()
    threads[0].join(timeout=10)
    assert len(consumed) == steps * b and len(set(consumed)) == len(consumed)
    assert worst[0] <= s
    assert not threads[0].is_alive()
    left = q.queued_prompt_ids()
    m = q.metrics()
    assert m["queue/accepted"] == len(produced) == len(set(produced))
    assert set(consumed).isdisjoint(left) and set(consumed + left) <= set(produced)
    # nothing lost: every accepted group was consumed, is still queued, or was dropped (counted)
    assert len(produced) - len(consumed) - len(left) == m["queue/dropped"]
    if producer_kind == "thread":  # groups finish in admission order: admission guarantees no drop
        assert m["queue/dropped"] == 0
    state = q.commit()
    q.close()
    assert ReplayQueue.recover(tmp_path / "j", state, max_staleness=s).queued_prompt_ids() == left


def test_recover_replays_consumed_but_uncommitted_groups_once(tmp_path):
    q = ReplayQueue("bounded", max_staleness=5, journal_dir=tmp_path / "j", fsync="always")
    for i in range(6):
        q.put(make_group(f"g{i}", 0))
    q.get_batch(2)
    state = q.commit()  # checkpoint k: g0, g1 consumed
    q.get_batch(2)  # consumed after the checkpoint: the restarted trainer has not trained on them
    q.put(make_group("g6", 0))
    q.close()
    r = ReplayQueue.recover(tmp_path / "j", state, max_staleness=5)
    assert r.queued_prompt_ids() == ["g2", "g3", "g4", "g5", "g6"]
    assert r.accepted_prompt_ids() >= {f"g{i}" for i in range(7)}
    assert not r.put(make_group("g3", 0))
    assert r.metrics()["queue/consumed"] == 2  # counters continue from the checkpoint


def test_recover_after_out_of_order_consumption(tmp_path):
    """FIFO by version consumes a later-accepted older group first; the commit must remember exactly that."""
    q = ReplayQueue("bounded", max_staleness=5, journal_dir=tmp_path / "j")
    q.put(make_group("newer", 1))
    q.put(make_group("older", 0))  # accepted second (seq 1), consumed first
    assert [g.prompt_id for g in q.get_batch()] == ["older"]
    state = q.commit()
    assert state["low_water"] == 0 and state["consumed_above"] == [1]
    q.close()
    assert ReplayQueue.recover(tmp_path / "j", state, max_staleness=5).queued_prompt_ids() == ["newer"]
