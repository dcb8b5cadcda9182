"""EngineFarm: routing, retries after a SIGKILLed engine process, timeouts, health, membership, weight updates."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.queue import ReplayQueue
from megatron_m2po.rollout.engines.base import EngineError
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
from megatron_m2po.rollout.farm import EngineFarm, FarmError
from megatron_m2po.types import Group, SamplingParams

torch.set_num_threads(1)
PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=2)


@pytest.fixture
def engines(hf_dir):
    engs = [LocalEngine(hf_dir, engine_id=f"e{i}", seed=i) for i in range(2)]
    yield engs
    for e in engs:
        asyncio.run(e.close())


async def _wait_until(predicate, timeout=30.0):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def test_engine_process_killed_mid_request_is_retried_nothing_lost(hf_dir, tmp_path):
    """Two engine processes behind SGLang's HTTP API; one is SIGKILLed while it holds requests. Every group
    still arrives once, from the survivor; the queue accepts each prompt exactly once."""
    with EngineLauncher(hf_dir, servers=2, backend="local", log_dir=tmp_path) as launcher:
        victim, survivor = launcher.engines(request_timeout=60)
        queue = ReplayQueue("bounded", max_staleness=4, groups_per_update=8, capacity=64)

        async def run():
            farm = EngineFarm([victim, survivor], max_attempts=3)
            await victim.pause()  # its requests stay in flight until the kill
            tasks = [
                asyncio.ensure_future(farm.generate(f"p{i}", [10 + i, 11, 12], 2, PARAMS)) for i in range(6)
            ]
            await _wait_until(lambda: farm._slots[victim.engine_id].tasks)
            held = len(farm._slots[victim.engine_id].tasks)
            launcher.kill("server-0")
            groups = await asyncio.gather(*tasks)
            metrics = farm.metrics()
            healthy = await farm.check_health()
            # a retry of an already-accepted group (at-least-once generation) is not accepted twice
            again = await farm.generate("p0", [10, 11, 12], 2, PARAMS)
            await farm.close()
            return held, groups, metrics, healthy, again

        held, groups, metrics, healthy, again = asyncio.run(run())
    assert held >= 1
    assert metrics["rollout/farm_retries"] >= held and metrics["rollout/farm_failures"] >= held
    assert healthy == {victim.engine_id: False, survivor.engine_id: True}
    for i, samples in enumerate(groups):
        assert [s.group_index for s in samples] == [0, 1]
        assert all(s.engine_id == survivor.engine_id and s.prompt_id == f"p{i}" for s in samples)
        assert all(len(s.response_ids) == len(s.behavior_logprobs) > 0 for s in samples)
        assert queue.put(Group(f"p{i}", samples[0].prompt_ids, samples))
    assert not queue.put(Group("p0", again[0].prompt_ids, again))
    assert queue.accepted_prompt_ids() == {f"p{i}" for i in range(6)}
    assert len(queue.get_batch(6, timeout=5)) == 6


def test_least_loaded_routing(engines):
    async def run():
        farm = EngineFarm(engines)
        for e in engines:
            await e.pause()
        tasks = [asyncio.ensure_future(farm.generate(f"p{i}", [5, 6], 1, PARAMS)) for i in range(4)]
        await _wait_until(lambda: sum(len(s.tasks) for s in farm._slots.values()) == 4)
        loads = sorted(len(s.tasks) for s in farm._slots.values())
        for e in engines:
            await e.resume()
        out = await asyncio.gather(*tasks)
        return loads, out

    loads, out = asyncio.run(run())
    assert loads == [2, 2]
    assert {o[0].engine_id for o in out} == {"e0", "e1"}


def test_timeout_retries_on_another_engine_and_health_recovers(engines):
    async def run():
        farm = EngineFarm(engines, request_timeout=0.5, max_engine_failures=1)
        await engines[0].pause()  # e0 hangs: the attempt times out, e1 serves it, e0 leaves rotation
        farm._slots["e1"].served = 10  # make e0 the first choice
        (s,) = await farm.generate("p", [5, 6], 1, PARAMS)
        m = farm.metrics()
        unhealthy = farm._slots["e0"].healthy
        await engines[0].resume()
        status = await farm.check_health()  # health probe puts e0 back in rotation
        return s, m, unhealthy, status

    s, m, unhealthy, status = asyncio.run(run())
    assert s.engine_id == "e1" and m["rollout/farm_timeouts"] == 1 and m["rollout/farm_retries"] == 1
    assert unhealthy is False and status == {"e0": True, "e1": True}


def test_cancelled_or_closed_engine_task_is_retried(engines):
    async def run():
        farm = EngineFarm(engines)
        farm._slots["e1"].served = 10
        await engines[0].pause()
        task = asyncio.ensure_future(farm.generate("p", [5, 6], 1, PARAMS))
        await _wait_until(lambda: farm._slots["e0"].tasks)
        next(iter(farm._slots["e0"].tasks)).cancel()  # the engine-side task dies
        (s,) = await task
        await engines[0].close()  # a closed engine raises EngineError: retried too
        farm._slots["e0"].healthy = True
        farm._slots["e0"].served = 0
        (t,) = await farm.generate("q", [5, 6], 1, PARAMS)
        return s, t, farm.metrics()

    s, t, m = asyncio.run(run())
    assert s.engine_id == "e1" and t.engine_id == "e1" and m["rollout/farm_retries"] == 2


def test_all_engines_failing_raises_after_max_attempts(engines):
    async def run():
        farm = EngineFarm(engines, max_attempts=3, no_engine_timeout=1.0, max_engine_failures=1)
        for e in engines:
            await e.close()
        with pytest.raises(FarmError, match="request p: no healthy engine"):
            await farm.generate("p", [5, 6], 1, PARAMS)

    asyncio.run(run())


def _perturbed(engine):
    return {k: v + 0.02 * torch.randn_like(v) for k, v in engine.state_dict().items()}


def test_abort_on_update_resubmits_on_new_weights(engines):
    async def run():
        farm = EngineFarm(engines, inflight_on_update="abort")
        for e in engines:
            await e.pause()
        tasks = [asyncio.ensure_future(farm.generate(f"p{i}", [5, 6, 7], 2, PARAMS)) for i in range(3)]
        await _wait_until(lambda: sum(len(s.tasks) for s in farm._slots.values()) == 3)
        await farm.update_weights(_perturbed(engines[0]).items(), version=1)  # finishing resumes the engines
        for e in engines:
            await e.resume()
        return await asyncio.gather(*tasks), farm.metrics(), farm.version

    groups, m, version = asyncio.run(run())
    assert version == 1 and m["rollout/farm_resubmitted"] == 3 and m["rollout/farm_failures"] == 0
    assert all(s.versions == [1] * len(s.versions) for g in groups for s in g)


def test_continue_on_update_keeps_inflight_requests(engines):
    async def run():
        farm = EngineFarm(engines, inflight_on_update="continue")
        for e in engines:
            await e.pause()
        tasks = [asyncio.ensure_future(farm.generate(f"p{i}", [5, 6, 7], 1, PARAMS)) for i in range(2)]
        await _wait_until(lambda: sum(len(s.tasks) for s in farm._slots.values()) == 2)
        await farm.update_weights(_perturbed(engines[0]).items(), version=3)
        for e in engines:
            await e.resume()
        return await asyncio.gather(*tasks), farm.metrics()

    groups, m = asyncio.run(run())
    assert m["rollout/farm_resubmitted"] == 0
    assert all(s.versions and set(s.versions) <= {3} for g in groups for s in g)


def test_add_and_remove_engines_at_run_time(hf_dir, engines):
    late = LocalEngine(hf_dir, engine_id="late", version=0)

    async def run():
        farm = EngineFarm([engines[0]])
        await farm.update_weights(_perturbed(engines[0]).items(), version=1)
        farm.add_engine(late)  # still at v0: not routed until a weight update reaches it
        assert not farm._slots["late"].routable
        outs = [await farm.generate(f"a{i}", [5], 1, PARAMS) for i in range(3)]
        assert {o[0].engine_id for o in outs} == {"e0"}
        await farm.update_weights(_perturbed(engines[0]).items(), version=2)
        assert farm._slots["late"].routable and late.version == 2
        await engines[0].pause()
        task = asyncio.ensure_future(farm.generate("moved", [5], 1, PARAMS))
        farm._slots["late"].served = 99
        await _wait_until(lambda: farm._slots["e0"].tasks)
        await farm.remove_engine("e0", drain=False, close=False)  # its request is resubmitted to "late"
        (s,) = await task
        await engines[0].resume()
        with pytest.raises(KeyError, match="e0"):
            await farm.remove_engine("e0")
        return s, [e.engine_id for e in farm.engines]

    s, remaining = asyncio.run(run())
    asyncio.run(late.close())
    assert s.engine_id == "late" and s.versions == [2] * len(s.versions)
    assert remaining == ["late"]


class FlakyEngine(LocalEngine):
    """A real LocalEngine that fails the calls a test schedules (fault injection, like a crashing server)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures: list[bool] = []

    async def generate(self, prompt_id, prompt_ids, n, params):
        if self.failures and self.failures.pop(0):
            await asyncio.sleep(0)
            raise EngineError(f"{self.engine_id}: injected failure")
        return await super().generate(prompt_id, prompt_ids, n, params)


@pytest.fixture(scope="module")
def flaky(hf_dir):
    engines = [FlakyEngine(hf_dir, engine_id=f"f{i}", seed=i) for i in range(3)]
    yield engines
    for e in engines:
        asyncio.run(e.close())


@given(
    schedules=st.lists(st.lists(st.booleans(), max_size=6), min_size=3, max_size=3),
    n_requests=st.integers(1, 6),
)
@settings(max_examples=25, deadline=None)
def test_every_request_answered_once_under_random_failures(flaky, schedules, n_requests):
    """Any failure pattern that leaves one engine working: every request returns its own group exactly once, and
    every injected failure that was hit is counted."""
    schedules[2] = []  # f2 never fails
    for engine, schedule in zip(flaky, schedules):
        engine.failures = list(schedule)
    injected = sum(map(sum, schedules))

    async def run():
        farm = EngineFarm(flaky, max_attempts=4, no_engine_timeout=5.0)
        out = await asyncio.gather(*(farm.generate(f"r{i}", [7, 8, 9], 2, PARAMS) for i in range(n_requests)))
        return out, farm.metrics()

    out, m = asyncio.run(run())
    assert [[s.prompt_id for s in g] for g in out] == [[f"r{i}"] * 2 for i in range(n_requests)]
    assert all([s.group_index for s in g] == [0, 1] for g in out)
    left = sum(map(sum, (e.failures for e in flaky)))
    assert m["rollout/farm_failures"] == injected - left


def test_an_update_with_no_engine_in_rotation_says_so_and_the_run_goes_on(engines, caplog):
    """Every engine unhealthy at a push (one restarting, the other's probe timed out on a loaded machine, as the
    random chaos test met): the push is logged as reaching nobody, the farm takes the new version, and the
    engines stay out of rotation until they hold it (the next update or a catch-up from disk)."""

    async def run():
        farm = EngineFarm(engines[:1])
        farm._slots["e0"].healthy = False
        await farm.update_weights_from_disk("unused", 1)
        return farm

    farm = asyncio.run(run())
    assert re.search(r"update from disk to v1: no engine to send it to .*e0\(v0 unhealthy", caplog.text)
    assert farm.version == 1 and engines[0].version == 0 and not farm._slots["e0"].routable


def test_a_health_check_during_an_update_keeps_an_engine_that_is_already_ahead(engines):
    async def run():
        farm = EngineFarm(engines[:1])
        targets = farm._start_update()  # the update is in flight: e0 already serves v1, the farm v0
        engines[0]._version = 1
        status = await farm.check_health()
        kept = farm._slots["e0"].synced
        farm._end_update(targets, 1)
        return status, kept, farm._slots["e0"].routable

    status, kept, routable = asyncio.run(run())
    assert status == {"e0": True} and kept and routable
