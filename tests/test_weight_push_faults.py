"""A weight push over the distributed transport (gloo here, NCCL on GPU: tests/test_weight_sync.py's gpu
test) to two real CPU engine server processes, one of which is SIGSTOPped or SIGKILLed mid-push: the push
ends within its bound, the engine leaves the update and rotation, the group is rebuilt for the survivor
under a new name, and the survivor serves the new weights (log-probs equal the trainer's)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from datetime import timedelta

import pytest
import torch

import megatron_m2po.sync.weight_sync as weight_sync
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.models import load_hf_config
from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.net import free_port
from megatron_m2po.platform import destroy_distributed, init_distributed
from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.sync import WeightSync
from megatron_m2po.sync.broadcast import DistributedWeightBroadcaster
from tests.test_weight_sync import PARAMS, PROMPTS, max_diff, trainer_logprobs

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)
TIMEOUT = 8.0  # rollout.weight_sync_timeout of these pushes


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    hf_dir = make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"), seed=3)
    init_distributed()
    model = load_policy(hf_dir, dtype=torch.float32)
    yield hf_dir, model, load_hf_config(hf_dir)
    destroy_distributed()


@pytest.fixture
def push(policy, tmp_path, monkeypatch):
    """Two engine servers behind a farm and a gloo WeightSync to both; `fault(sig)` arms a signal sent to
    the second server after the push's fourth tensor. Everything is stopped and joined afterwards."""
    hf_dir, model, hf_config = policy
    threads_before = set(threading.enumerate())
    _train(model)
    launcher = EngineLauncher(hf_dir, servers=2, backend="local", log_dir=tmp_path)
    with launcher:
        survivor, victim = launcher.engines(health_timeout=1.0, control_timeout=60.0)
        farm = EngineFarm([survivor, victim], update_timeout=TIMEOUT, max_engine_failures=1)
        broadcaster = DistributedWeightBroadcaster(
            farm.engines, master_address="127.0.0.1", master_port=free_port(), backend="gloo", timeout=TIMEOUT
        )
        sync = WeightSync(
            model, hf_config, farm, transport="distributed", broadcaster=broadcaster, bucket_bytes=64 << 10
        )
        broadcaster.connect(sync.loop)
        real = weight_sync.iter_hf_tensors

        def fault(sig):
            def iter_with_fault(model, hf_config):
                monkeypatch.setattr(weight_sync, "iter_hf_tensors", real)  # this push only
                for i, item in enumerate(real(model, hf_config)):
                    if i == 4:
                        launcher.kill("server-1", sig)
                    yield item

            monkeypatch.setattr(weight_sync, "iter_hf_tensors", iter_with_fault)

        def run(coro):
            return asyncio.run_coroutine_threadsafe(coro, sync.loop).result(timeout=120)

        try:
            yield launcher, farm, sync, survivor, victim, fault, run
        finally:
            monkeypatch.setattr(weight_sync, "iter_hf_tensors", real)
            if launcher.procs["server-1"].poll() is None:
                launcher.kill("server-1", signal.SIGCONT)
            sync.broadcaster.close(sync.loop)  # the servers leave the group before the clients close
            run(farm.close())
            sync.close()
    assert not [t for t in set(threading.enumerate()) - threads_before if not t.daemon]


def _serves(run, farm, model, engine_id, version, prompt=PROMPTS[0]):
    """A group from the farm comes from `engine_id`, at `version`, with the trainer's log-probs."""
    out = run(farm.generate("q", prompt, 2, PARAMS))
    assert {s.engine_id for s in out} == {engine_id}
    assert all(s.versions == [version] * len(s.response_ids) for s in out)
    assert max_diff(out, trainer_logprobs(model, out)) <= 1e-5


def _train(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))


def test_member_hung_or_killed_mid_push_is_dropped_and_the_push_completes(push, policy):
    """SIGSTOP mid-push: the broadcast and the member's reply time out, its health check fails, it is dropped
    and the survivor gets the bucket again on a new group; continued, it answers, and the next push rebuilds
    the group with it. Then SIGKILL mid-push: the broken broadcast is noticed at once, the dead member is
    dropped, the survivor completes, and a further push goes to the survivor alone on the rebuilt group."""
    launcher, farm, sync, survivor, victim, fault, run = push
    model = policy[1]
    first_group = sync.broadcaster.group_name

    fault(signal.SIGSTOP)
    t0 = time.monotonic()
    metrics = sync.push_collective(version=1)
    assert time.monotonic() - t0 < 3 * TIMEOUT
    assert metrics["sync/engines_dropped"] == 1 and metrics["sync/buckets"] > 4
    assert survivor.version == farm.version == 1 and victim.version == 0
    assert not farm._slots[victim.engine_id].routable
    assert sync.broadcaster.engines == [survivor] and sync.broadcaster.group_name != first_group
    _serves(run, farm, model, survivor.engine_id, 1)

    launcher.kill("server-1", signal.SIGCONT)
    assert run(farm.check_health()) == {survivor.engine_id: True, victim.engine_id: True}
    _train(model)
    assert sync.push_collective(version=2)["sync/engines_dropped"] == 0
    assert sync.broadcaster.engines == [survivor, victim]
    assert survivor.version == victim.version == 2 and farm._slots[victim.engine_id].routable
    farm._slots[survivor.engine_id].served += 100
    _serves(run, farm, model, victim.engine_id, 2, PROMPTS[1])

    _train(model)
    fault(signal.SIGKILL)
    t0 = time.monotonic()
    metrics = sync.push_collective(version=3)
    assert time.monotonic() - t0 < TIMEOUT  # a dead member's broken connection is noticed at once
    assert launcher.procs["server-1"].poll() is not None
    assert metrics["sync/engines_dropped"] == 1
    assert survivor.version == farm.version == 3 and victim.version == 2
    assert not farm._slots[victim.engine_id].routable
    assert farm.metrics()["rollout/engines_dropped_from_update"] == 2
    assert sync.broadcaster.engines == [survivor]
    _serves(run, farm, model, survivor.engine_id, 3)
    rebuilt = sync.broadcaster.group_name
    _train(model)
    assert sync.push_collective(version=4)["sync/engines_dropped"] == 0
    assert sync.broadcaster.group_name == rebuilt
    _serves(run, farm, model, survivor.engine_id, 4)


MEMBER_THAT_NEVER_RECEIVES = """
import sys, time
from megatron_m2po.sync.process_group import new_weight_update_group
group = new_weight_update_group("127.0.0.1", int(sys.argv[1]), 1, 2, sys.argv[2], "gloo")
print("joined", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("member_dies", [True, False], ids=["member-killed", "member-alive"])
def test_a_given_up_broadcast_reports_a_dead_members_broken_connection_not_a_stuck_group(member_dies):
    """A member's HTTP reply often reports its death before the trainer's broadcast fails on the closed
    socket (the race CI hit): give_up() fires first. The broadcast then gets its grace to fail by itself:
    with the member killed it raises gloo's connection error (not stuck: destroying the group frees the
    other members at once); with the member alive but never receiving it is given up as stuck after the
    grace, well before the broadcast's own timeout."""
    import subprocess
    import sys

    from megatron_m2po.sync.process_group import (
        GIVE_UP_GRACE,
        abort_group,
        broadcast_from_trainer,
        new_weight_update_group,
    )
    from tests.conftest import subprocess_env

    port, name = free_port(), f"m2po_give_up-{member_dies}"
    proc = subprocess.Popen(
        [sys.executable, "-c", MEMBER_THAT_NEVER_RECEIVES, str(port), name],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        group = new_weight_update_group("127.0.0.1", port, 0, 2, name, "gloo", timeout=timedelta(seconds=60))
        assert proc.stdout.readline().strip() == "joined"
        if member_dies:
            threading.Timer(0.3, proc.kill).start()
        t0 = time.monotonic()
        with pytest.raises(Exception) as raised:  # 64 MiB cannot sit in socket buffers: the send waits
            broadcast_from_trainer(
                group, torch.zeros(1 << 24), timeout=60, give_up=lambda: "the member's reply failed"
            )
        elapsed = time.monotonic() - t0
        if member_dies:
            assert not isinstance(raised.value, TimeoutError), raised.value
            assert elapsed < GIVE_UP_GRACE
            abort_group(group, "gloo", stuck=False, timeout=60)
        else:
            assert isinstance(raised.value, TimeoutError)
            assert "given up: the member's reply failed" in str(raised.value)
            assert GIVE_UP_GRACE <= elapsed < GIVE_UP_GRACE + 5
            abort_group(group, "gloo", stuck=True, timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=30)


RECEIVER = """
import sys, torch
from megatron_m2po.sync.process_group import broadcast_from_trainer, new_weight_update_group
torch.cuda.set_device(1)
group = new_weight_update_group("127.0.0.1", int(sys.argv[1]), 1, 2, sys.argv[2], "nccl")
tensor = torch.empty(1 << 22, device="cuda:1")
while True:
    broadcast_from_trainer(group, tensor)
    print("received", float(tensor[0]), flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="NCCL takes one rank per GPU: the trainer on cuda:0, a member on cuda:1",
)
def test_nccl_push_to_a_hung_member_is_aborted_in_bounded_time(tmp_path):
    """The GPU path of the bound: an NCCL broadcast to a member process that stops (SIGSTOP) does not
    complete; broadcast_from_trainer raises within its timeout, abort_group aborts the communicator (a destroy
    would wait on the stuck kernel), and the trainer forms a new group under a new name with a new member."""
    import subprocess
    import sys

    from megatron_m2po.sync.process_group import abort_group, broadcast_from_trainer, new_weight_update_group
    from tests.conftest import subprocess_env

    def member(name):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(port), name],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        group = new_weight_update_group("127.0.0.1", port, 0, 2, name, "nccl", timeout=timedelta(seconds=60))
        return proc, group

    def push(group, value, timeout):
        broadcast_from_trainer(group, torch.full((1 << 22,), float(value), device="cuda:0"), timeout=timeout)

    torch.cuda.set_device(0)
    procs = []
    try:
        proc, group = member("m2po_nccl_fault-1")
        procs.append(proc)
        push(group, 1, timeout=60)
        assert proc.stdout.readline().strip() == "received 1.0"
        proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not complete within 3s"):
            push(group, 2, timeout=3)
        abort_group(group, "nccl", stuck=True, timeout=60)
        assert time.monotonic() - t0 < 30
        proc.kill()
        fresh, group = member("m2po_nccl_fault-2")
        procs.append(fresh)
        push(group, 3, timeout=60)
        assert fresh.stdout.readline().strip() == "received 3.0"
        abort_group(group, "nccl", stuck=True, timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
