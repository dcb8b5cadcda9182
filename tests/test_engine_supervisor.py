"""EngineSupervisor against real CPU engine servers (and the pinned sglang-router): a server killed with SIGKILL or
stopped with SIGSTOP is restarted after its backoff, the restart budget leaves it down, and behind a router the
failed server leaves the router at once and comes back only at the weight version its peers serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout.engines.sglang import SGLANG_VERSION
from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
from megatron_m2po.rollout.engines.supervisor import FAILED, UP, EngineSupervisor, RestartPolicy
from tests.conftest import REPO, subprocess_env

FAST = RestartPolicy(
    check_interval=0.2,
    health_timeout=1.0,
    unhealthy_after=2,
    backoff=0.5,
    backoff_max=1.0,
    max_restarts=2,
    start_timeout=240,
)
ROUTER_SRC = Path(os.environ.get("M2PO_SGLANG_SRC", f"~/.cache/m2po_ci/sglang-{SGLANG_VERSION}")).expanduser()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=2)


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"health_timeout": 0}, "--health-timeout"),
        ({"check_interval": -1.0}, "--check-interval"),
        ({"max_restarts": -1}, "--max-restarts"),
        ({"unhealthy_after": 1.5}, "--unhealthy-after"),
        ({"backoff": 10.0, "backoff_max": 5.0}, "--backoff-max"),
        ({"restart_window": float("nan")}, "--restart-window"),
    ],
)
def test_bad_restart_policy_is_refused_by_its_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        RestartPolicy(**kwargs)


def test_m2po_engines_refuses_a_bad_flag_before_starting_anything():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_m2po",
            "engines",
            "--model",
            "x",
            "--backend",
            "local",
            "--health-timeout",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert "--health-timeout must be a number > 0, got 0.0" in proc.stderr


def test_backoff_doubles_per_recent_restart_up_to_its_cap():
    policy = RestartPolicy(backoff=1.5, backoff_max=10.0)
    assert [policy.delay(k) for k in range(5)] == [1.5, 3.0, 6.0, 10.0, 10.0]
    assert policy.delay(10_000) == 10.0


def _until(supervisor: EngineSupervisor, done, what: str, timeout: float = 240.0) -> float:
    """Poll the supervisor until `done()`; returns the seconds it took."""
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what} not within {timeout}s: {supervisor.states()}")
        supervisor.poll()
        time.sleep(supervisor.policy.check_interval)
    return time.monotonic() - t0


def _pid(launcher: EngineLauncher, name: str = "server-0") -> int:
    return launcher.procs[name].pid


def test_a_killed_then_a_hung_server_is_restarted_until_the_budget_leaves_it_down(hf_dir, tmp_path, caplog):
    caplog.set_level("WARNING", logger="megatron_m2po.rollout.engines.supervisor")
    with EngineLauncher(hf_dir, servers=1, backend="local", log_dir=tmp_path) as launcher:
        supervisor = EngineSupervisor(launcher, FAST)
        first = _pid(launcher)
        os.killpg(first, signal.SIGKILL)
        _until(
            supervisor, lambda: _pid(launcher) != first and supervisor.states()["server-0"] == UP, "restart"
        )
        assert f"server-0 ({launcher.urls[0]}) exited with code -9; restart 1/2 in 0.5s" in caplog.text
        assert supervisor.stats() == {
            "engines_up": 1.0,
            "engines_down": 0.0,
            "engines_failed": 0.0,
            "restarts": 1.0,
        }

        second = _pid(launcher)
        os.killpg(second, signal.SIGSTOP)  # alive, answers nothing: killed after 2 failed probes
        _until(
            supervisor, lambda: _pid(launcher) != second and supervisor.states()["server-0"] == UP, "restart"
        )
        assert (
            "did not answer /health within 1.0s 2 times in a row (hung): killed; restart 2/2 in 1.0s"
            in caplog.text
        )

        os.killpg(_pid(launcher), signal.SIGKILL)  # a third failure within the window: past the budget
        _until(supervisor, lambda: supervisor.states()["server-0"] == FAILED, "left down", timeout=30)
        assert "2 restarts within 3600.0s (--max-restarts): left down" in caplog.text
        with pytest.raises(RuntimeError, match="every engine server failed more than --max-restarts=2 times"):
            supervisor.run()
        # a restart appends to the server's log: the failed run's lines stay for the operator
        assert (tmp_path / "server-0.log").read_text().count(f"serving {hf_dir} on {launcher.urls[0]}") == 3
    assert not launcher.procs  # stop() killed and collected every process it started


def _model_info(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/model_info", timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture()
def router_on_path(tmp_path, monkeypatch):
    """The pinned sglang-router importable by the launcher's router process (only it: a link to the package)."""
    if not (ROUTER_SRC / "sglang_router" / "launch_router.py").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"pinned sglang-router missing under {ROUTER_SRC} (.ci/run downloads it)")
        pytest.skip(f"pinned sglang-router missing under {ROUTER_SRC}")
    pytest.importorskip("setproctitle", reason="sglang-router's launcher imports it (dev extra)")
    path = tmp_path / "router_path"
    path.mkdir()
    (path / "sglang_router").symlink_to(ROUTER_SRC / "sglang_router")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO), str(path), os.environ.get("PYTHONPATH", "")])
    )


def test_behind_the_router_a_failed_server_leaves_it_and_rejoins_at_the_peers_weight_version(
    hf_dir, tmp_path, router_on_path, caplog
):
    caplog.set_level("WARNING", logger="megatron_m2po.rollout.engines.supervisor")
    with EngineLauncher(hf_dir, servers=2, backend="local", router=True, log_dir=tmp_path) as launcher:
        supervisor = EngineSupervisor(launcher, FAST)
        router = supervisor.router
        a, b = launcher.urls
        assert set(router.workers()) == {a, b}
        # the worker API as the pinned router answers it: a body without url, an id that is not the router's uuid
        assert router._call("POST", "/workers", {"urls": a})[0] == 422
        assert router._call("DELETE", "/workers/" + urllib.request.quote(a, safe=""))[0] == 400
        for url in (a, b):  # the trainer's update v3 reached both
            _post(url, "/update_weights_from_disk", {"model_path": str(hf_dir), "weight_version": "3"})
        os.killpg(_pid(launcher, "server-1"), signal.SIGKILL)
        # the supervisor sees the exit at its next probe and removes it before the router's own checks notice
        _until(supervisor, lambda: supervisor.states()["server-1"] != UP, "the exit seen", timeout=30)
        router.wait_listed(b, listed=False, timeout=30)
        assert set(router.workers()) == {a}
        _until(supervisor, lambda: supervisor.states()["server-1"] == "rejoining", "restart")
        assert _model_info(b)["weight_version"] == "0"  # start-up weights: it stays out of the router
        for _ in range(10):
            supervisor.poll()
        assert set(router.workers()) == {a}
        _post(b, "/update_weights_from_disk", {"model_path": str(hf_dir), "weight_version": "3"})
        _until(supervisor, lambda: supervisor.states()["server-1"] == UP, "rejoin", timeout=30)
        router.wait_listed(b, timeout=60)
        assert set(router.workers()) == {a, b}
        assert f"server-1 ({b}) rejoins the router at weight version 3" in caplog.text
