"""A hung engine (a real CPU engine server stopped with SIGSTOP: alive, not answering) behind the farm: its
requests time out and are served elsewhere once each, it leaves rotation after N failures, and returns when
it answers again (SIGCONT)."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest
import torch

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.queue import ReplayQueue
from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.types import Group, SamplingParams

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(240)
PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0)
N = 2  # samples per group


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two CPU engine server processes; a stopped one is continued before they are stopped."""
    hf_dir = make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=2)
    threads_before = set(threading.enumerate())
    launcher = EngineLauncher(hf_dir, servers=2, backend="local", log_dir=tmp_path_factory.mktemp("logs"))
    with launcher:
        yield launcher
        for name in list(launcher.procs):
            launcher.kill(name, signal.SIGCONT)
    assert not [t for t in set(threading.enumerate()) - threads_before if not t.daemon]


def _check_groups(groups, prompt_ids, engine_id):
    """Each group holds its own prompt's N samples once (indices 0..N-1), all from `engine_id`."""
    queue = ReplayQueue("bounded", max_staleness=4, groups_per_update=len(groups), capacity=64)
    for pid, samples in zip(prompt_ids, groups):
        assert [s.group_index for s in samples] == list(range(N))
        assert {s.prompt_id for s in samples} == {pid} and {s.engine_id for s in samples} == {engine_id}
        assert all(len(s.response_ids) == len(s.behavior_logprobs) > 0 for s in samples)
        assert queue.put(Group(pid, samples[0].prompt_ids, samples))
    assert queue.accepted_prompt_ids() == set(prompt_ids)
    return queue


def test_hung_engine_times_out_leaves_rotation_and_returns(servers):
    """Requests on the stopped server time out after `request_timeout` and are served by the other one,
    exactly once each; after `max_engine_failures` timeouts it is out of rotation (new requests go straight
    to the other), its health check fails while stopped, and after SIGCONT a health check brings it back."""
    hung, live = servers.engines(health_timeout=1.0)

    async def run():
        farm = EngineFarm([hung, live], request_timeout=2.0, max_engine_failures=2, max_attempts=3)
        await asyncio.gather(hung.connect(), live.connect())
        servers.kill("server-0", signal.SIGSTOP)
        prompt_ids = [f"p{i}" for i in range(4)]
        # least-loaded routing sends two of the four to the stopped server
        groups = await asyncio.gather(
            *(farm.generate(p, [10 + i, 11, 12], N, PARAMS) for i, p in enumerate(prompt_ids))
        )
        timed_out = farm.metrics()
        out_of_rotation = not farm._slots[hung.engine_id].routable
        # out of rotation: the next request goes straight to the live one (no timeout spent)
        t0 = asyncio.get_running_loop().time()
        after = await farm.generate("q", [9, 8, 7], N, PARAMS)
        direct_s = asyncio.get_running_loop().time() - t0
        stopped_health = await farm.check_health()
        servers.kill("server-0", signal.SIGCONT)
        resumed_health = await farm.check_health()
        farm._slots[live.engine_id].served += 100  # make the returned engine the first choice
        back = await farm.generate("r", [9, 8, 7], N, PARAMS)
        metrics = farm.metrics()
        await farm.close()
        return (
            prompt_ids,
            groups,
            timed_out,
            out_of_rotation,
            after,
            direct_s,
            stopped_health,
            resumed_health,
            back,
            metrics,
        )

    (prompt_ids, groups, timed_out, out_of_rotation, after, direct_s, stopped, resumed, back, metrics) = (
        asyncio.run(run())
    )
    _check_groups(groups, prompt_ids, live.engine_id)
    assert timed_out["rollout/farm_timeouts"] == 2 and timed_out["rollout/farm_retries"] == 2
    assert out_of_rotation and timed_out["rollout/engines_left_rotation"] == 1
    assert {s.engine_id for s in after} == {live.engine_id} and direct_s < 2.0
    assert stopped == {hung.engine_id: False, live.engine_id: True}
    assert resumed == {hung.engine_id: True, live.engine_id: True}
    assert {s.engine_id for s in back} == {hung.engine_id}
    assert metrics["rollout/engines_healthy"] == 2


def test_missed_health_checks_move_a_hung_engines_requests(servers):
    """With a long request timeout, the health loop notices the stopped server first: after
    `max_engine_failures` missed checks its requests in flight are resubmitted to the other server, long
    before `request_timeout`; nothing is produced twice."""
    hung, live = servers.engines(health_timeout=0.5)

    async def run():
        farm = EngineFarm(
            [hung, live], request_timeout=120.0, max_engine_failures=2, health_interval=0.3, max_attempts=3
        )
        await asyncio.gather(hung.connect(), live.connect())
        farm._slots[live.engine_id].served += 100
        servers.kill("server-0", signal.SIGSTOP)
        farm.start()
        t0 = asyncio.get_running_loop().time()
        groups = await asyncio.gather(
            farm.generate("a", [10, 11, 12], N, PARAMS), farm.generate("b", [13, 11], N, PARAMS)
        )
        seconds = asyncio.get_running_loop().time() - t0
        metrics = farm.metrics()
        servers.kill("server-0", signal.SIGCONT)
        await farm.close()
        return groups, seconds, metrics

    groups, seconds, metrics = asyncio.run(run())
    _check_groups(groups, ["a", "b"], live.engine_id)
    assert seconds < 30
    assert metrics["rollout/farm_resubmitted"] >= 1 and metrics["rollout/farm_timeouts"] == 0
