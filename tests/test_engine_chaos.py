"""Chaos on the engine side, on CPU with real engine servers: an engine killed with SIGKILL in the middle of a
bounded-mode run (`m2po engines` restarts it), and engines behind a slow, stalling or connection-dropping link
(a TCP proxy on loopback: the kernels here have no netem). The run finishes its steps with the journal's
invariants (nothing lost, nothing trained twice, the staleness bound held), the metrics record each fault, and
every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_m2po.metrics import read_scalars
from megatron_m2po.net import is_healthy
from megatron_m2po.rollout.engines.sglang import SGLangEngine
from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.types import SamplingParams
from tests.conftest import REPO
from tests.fault_injection.tcp_proxy import TcpProxy
from tests.test_train_e2e import (
    BOUNDED_OVERRIDES,
    _reap,
    _start,
    _wait_for_step,
    assert_bounded_invariants,
    consumed,
    env,
    setup,  # noqa: F401 - the fixture `tiny` builds on
)

torch.set_num_threads(1)
PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0)
N = 2


# --------------------------------------------------------------------------------------- network faults
@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from megatron_m2po.models.tiny import make_tiny_model

    hf_dir = make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=2)
    threads_before = set(threading.enumerate())
    with EngineLauncher(
        hf_dir, servers=2, backend="local", log_dir=tmp_path_factory.mktemp("logs")
    ) as launcher:
        yield launcher
    assert not [t for t in set(threading.enumerate()) - threads_before if not t.daemon]


@pytest.mark.timeout(180)
def test_slow_stalling_and_dropping_links_cost_bounded_time_and_lose_nothing(servers):
    """Engine `far` sits behind the proxy, `near` is direct. A slow link only delays `far`'s replies; a
    stalling one costs one `request_timeout` and the request is served by `near`; a dropping one fails at once
    and is served by `near`; two failures in a row take `far` out of rotation, its health check fails while
    the link drops, and it returns once the link is back. Each prompt is answered exactly once."""
    far_port = servers.ports[0]
    with TcpProxy("127.0.0.1", far_port, delay=0.2) as proxy:
        far = SGLangEngine(proxy.url, engine_id="far", health_timeout=1.0)
        near = SGLangEngine(servers.urls[1], engine_id="near", health_timeout=1.0)

        async def run():
            farm = EngineFarm([far, near], request_timeout=3.0, max_engine_failures=2, max_attempts=3)
            slots, seen, took = farm._slots, {}, {}

            async def generate(name, mode):
                proxy.set_mode(mode)
                slots["near"].served = slots["far"].served + 100  # `far` is the least-loaded choice
                t0 = time.monotonic()
                seen[name] = await farm.generate(name, [10, 11, 12], N, PARAMS)
                took[name] = time.monotonic() - t0

            await asyncio.gather(far.connect(), near.connect())
            await generate("clear", "pass")
            await generate("slow", "slow")
            await generate("stalled", "stall")
            after_stall = farm.metrics()
            await generate("dropped", "drop")
            after_drop, far_routable = farm.metrics(), slots["far"].routable
            health_dropping = await farm.check_health()
            proxy.set_mode("pass")
            health_back = await farm.check_health()
            await generate("back", "pass")
            final = farm.metrics()
            await farm.close()
            return seen, took, after_stall, after_drop, far_routable, health_dropping, health_back, final

        seen, took, after_stall, after_drop, far_routable, dropping, back, final = asyncio.run(run())
    engines = {name: {s.engine_id for s in samples} for name, samples in seen.items()}
    assert engines == {
        "clear": {"far"},
        "slow": {"far"},
        "stalled": {"near"},
        "dropped": {"near"},
        "back": {"far"},
    }
    for name, samples in seen.items():
        assert [s.group_index for s in samples] == list(range(N)) and {s.prompt_id for s in samples} == {name}
    assert took["slow"] > 0.2  # the delay was real
    assert 3.0 <= took["stalled"] < 3.0 + 10  # one request_timeout, then `near`
    assert took["dropped"] < 3.0  # a reset fails at once: no timeout spent
    assert after_stall["rollout/farm_timeouts"] == 1 and after_stall["rollout/farm_retries"] == 1
    assert after_drop["rollout/farm_failures"] == 2 and after_drop["rollout/engines_left_rotation"] == 1
    assert (
        not far_routable and dropping == {"far": False, "near": True} and back == {"far": True, "near": True}
    )
    assert final["rollout/engines_healthy"] == 2 and final["rollout/engines_out_of_rotation_s"] > 0
    assert proxy.connections > 0


# --------------------------------------------------------------------------------- a killed engine in a run
@pytest.fixture(scope="module")
def tiny(request):
    return request.getfixturevalue("setup")


@pytest.fixture()
def supervised_engines(tiny, tmp_path):
    """`m2po engines --backend local --servers 2` (the real command, supervising), its URLs and process."""
    root, _ = tiny
    model = next(root.glob("tiny*"))
    log = tmp_path / "engines.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_m2po",
            "engines",
            "--model",
            str(model),
            "--backend",
            "local",
            "--servers",
            "2",
            "--base-port",
            str(_free_port_pair()),
            "--log-dir",
            str(tmp_path / "engine_logs"),
            "--check-interval",
            "0.5",
            "--health-timeout",
            "2",
            "--unhealthy-after",
            "2",
            "--backoff",
            "0.5",
        ],
        env=env(),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    try:
        line = proc.stdout.readline()  # the URLs, once every server is healthy
        if not line.strip():
            pytest.fail(f"m2po engines printed no URLs ({proc.poll()}): {log.read_text()[-3000:]}")
        yield line.split(), proc, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        _reap(proc)
        proc.stdout.close()


def _free_port_pair() -> int:
    """A base port with the next one free too (the servers listen on base and base + 1)."""
    import socket

    for _ in range(100):
        base = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two free ports in a row")


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {text!r}: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s: {log.read_text()[-4000:]}"
        time.sleep(0.1)


def _server_pid(engines_proc: subprocess.Popen, url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for child in psutil.Process(engines_proc.pid).children(recursive=True):
        cmd = child.cmdline()
        if "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            return child.pid
    raise AssertionError(f"no server process for {url}")


@pytest.mark.timeout(600)
def test_an_engine_killed_during_generation_is_restarted_and_the_run_loses_and_repeats_nothing(
    tiny, supervised_engines, tmp_path
):
    """Bounded mode, two supervised CPU engine servers, weights from disk. One server is killed with SIGKILL
    while the run generates: its requests are served by the other, the supervisor restarts it, the farm sees
    its start-up weights, loads the last pushed version into it from disk and takes it back. Every step trains
    once, no group twice, max_staleness holds, every accepted group is consumed, queued or counted dropped,
    and the metrics record the fault."""
    root, recipe = tiny
    urls, engines_proc, engines_log = supervised_engines
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    overrides = [
        *BOUNDED_OVERRIDES,
        "train.steps=8",
        "rollout.engine=sglang",
        f"rollout.urls={','.join(urls)}",
        "rollout.health_interval=0.5",
        "rollout.request_timeout=60",
    ]
    proc = _start(recipe, run_dir, overrides, log, resume=False)
    try:
        # after step 2 the engines hold a pushed version, not their start-up weights
        _wait_for_step(proc, run_dir, 2, log)
        victim = _server_pid(engines_proc, urls[0])
        os.kill(victim, signal.SIGKILL)
        _wait_for(log, "engine sglang-0 leaves rotation", proc)  # its requests failed, or a health check did
        # Hold the trainer until the supervisor has the server back, so that the rest of the run meets the
        # restarted server whatever this machine's speed: the farm must see its start-up weights and bring it
        # to the current version before it takes requests again.
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            _wait_for(engines_log, f"server-0 ({urls[0]}) is back", engines_proc)
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        assert proc.wait(400) == 0, log.read_text()[-6000:]
    finally:
        _reap(proc)
    assert_bounded_invariants(run_dir, 8)
    supervisor_log, train_log = engines_log.read_text(), log.read_text()
    assert f"server-0 ({urls[0]}) exited with code -9; restart 1/5" in supervisor_log
    # the farm saw the restarted server's start-up weights before it loaded a pushed version from disk
    assert f"sglang-0: {urls[0]} serves weight version '0'" in train_log, train_log[-4000:]
    series = read_scalars(run_dir)
    last = {tag: values[-1][1] for tag, values in series.items() if values}
    assert last["rollout/engine_restarts"] == 1, last
    # the kill is seen: the engine left rotation (its requests in flight, if any, failed over: farm_failures)
    # and its time out of it is counted
    assert last["rollout/engines_left_rotation"] >= 1, last
    assert last["rollout/engines_out_of_rotation_s"] > 0, last
    assert last["rollout/engines_up"] == 2 and last["rollout/engines_healthy"] == 2, last


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_random_engine_faults_for_minutes_lose_and_repeat_nothing(tiny, supervised_engines, tmp_path):
    """For M2PO_CHAOS_SECONDS (default 240) a bounded-mode run meets random faults, one engine at a time (the
    other answering): SIGKILL, or SIGSTOP for 1-6 s (long enough, sometimes, for the supervisor to kill it as
    hung). Then SIGTERM stops the run at a step; the journal's invariants hold over every step it trained."""
    root, recipe = tiny
    urls, engines_proc, engines_log = supervised_engines
    seconds = float(os.environ.get("M2PO_CHAOS_SECONDS", "240"))
    rng = random.Random(0)
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    overrides = [
        *BOUNDED_OVERRIDES,
        "train.steps=100000",
        "rollout.engine=sglang",
        f"rollout.urls={','.join(urls)}",
        "rollout.health_interval=0.5",
        "rollout.request_timeout=30",
    ]
    proc = _start(recipe, run_dir, overrides, log, resume=False)
    faults: list[tuple[str, str]] = []
    stopped: set[int] = set()
    try:
        _wait_for_step(proc, run_dir, 2, log)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(rng.uniform(2.0, 6.0))
            assert proc.poll() is None, log.read_text()[-4000:]
            victim, other = rng.sample(urls, 2)
            if not is_healthy(other, timeout=2.0) or not is_healthy(victim, timeout=2.0):
                continue  # one fault at a time: the other engine must be serving
            pid = _server_pid(engines_proc, victim)
            if rng.random() < 0.5:
                os.kill(pid, signal.SIGKILL)
                faults.append((victim, "kill"))
            else:
                os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
                faults.append((victim, "stop"))
                time.sleep(rng.uniform(1.0, 6.0))
                with contextlib.suppress(ProcessLookupError):  # the supervisor may have killed it as hung
                    os.kill(pid, signal.SIGCONT)
                stopped.discard(pid)
        proc.send_signal(signal.SIGTERM)  # checkpoints at the step it is in and exits 0
        assert proc.wait(300) == 0, log.read_text()[-6000:]
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        _reap(proc)
    steps = max(r["step"] for r in consumed(run_dir))
    assert steps > 2 and len(faults) >= 2, (steps, faults)
    assert_bounded_invariants(run_dir, steps)
    last = {tag: values[-1][1] for tag, values in read_scalars(run_dir).items() if values}
    assert last["rollout/engines_left_rotation"] >= 1, last
    kills = sum(kind == "kill" for _, kind in faults)
    assert engines_log.read_text().count("exited with code -9") >= kills
