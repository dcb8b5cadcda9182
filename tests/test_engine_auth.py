"""API keys from the job scripts to every engine server and back to the client.

node.sh and the SLURM scripts make or take one key per job and start each role in its own environment;
the launcher hands the key to every server (and the router) and to the clients it builds; a real CPU engine
server started by the launcher refuses calls without it.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout.build import build_engines
from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
from megatron_m2po.types import SamplingParams

REPO = Path(__file__).resolve().parents[1]
NODE_SH = REPO / "examples" / "common" / "node.sh"


def _recorder(path: Path, out: Path) -> Path:
    """A stand-in interpreter that records its arguments and the key it was given, then exits 0."""
    path.write_text(f'#!/usr/bin/env bash\necho "$(basename "$0") KEY=$M2PO_API_KEY ARGS=$*" >> {out}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _node(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    out = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _recorder(bin_dir / "curl", out)  # wait_healthy's probe succeeds at once
    base = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "RECIPE": "r.yaml",
        "MODEL_DIR": "m",
        "TRAIN_DATA": "d.jsonl",
        "ENGINE_TP": "2",
        "LOG_DIR": str(tmp_path / "logs"),
        "ROLLOUT_PYTHON": str(_recorder(tmp_path / "rollout-python", out)),
        "TRAINER_PYTHON": str(_recorder(tmp_path / "trainer-python", out)),
    }
    proc = subprocess.run(
        ["bash", str(NODE_SH)], env={**base, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    deadline = time.monotonic() + 10  # a single node's servers start in the background
    while env.get("NNODES") == "1" and "rollout-python" not in _read(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc, _read(out).splitlines()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_rollout_node_serves_in_the_rollout_environment_with_the_key(tmp_path):
    proc, calls = _node(tmp_path, NNODES="2", NODE_RANK="1", M2PO_API_KEY="s3cret")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call.startswith("rollout-python KEY=s3cret ARGS=-m megatron_m2po engines")
    assert "--host 0.0.0.0" in call and "--tp 2 " in call and "--servers 4 " in call


def test_rollout_node_passes_its_supervision_flags_to_the_engines(tmp_path):
    proc, calls = _node(
        tmp_path, NNODES="2", NODE_RANK="1", M2PO_API_KEY="k", ENGINE_SUPERVISION="--max-restarts 9 --backoff 3"
    )
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call.endswith("--max-restarts 9 --backoff 3")


def test_trainer_node_trains_in_the_trainer_environment_with_the_key(tmp_path):
    proc, calls = _node(tmp_path, NNODES="2", NODE_RANK="0", M2PO_API_KEY="s3cret", ROLLOUT_HOSTS="r0")
    assert proc.returncode == 0, proc.stderr
    trainer = [c for c in calls if c.startswith("trainer-python")]
    assert trainer == [c for c in calls if "torch.distributed.run" in c] and len(trainer) == 1
    assert "KEY=s3cret" in trainer[0]
    assert "rollout.urls=http://r0:30000,http://r0:30001,http://r0:30002,http://r0:30003" in trainer[0]


def test_multi_node_job_without_a_key_is_refused(tmp_path):
    proc, calls = _node(tmp_path, NNODES="2", NODE_RANK="1")
    assert proc.returncode == 1 and "M2PO_API_KEY" in proc.stderr and calls == []


def test_single_node_makes_its_own_key_and_serves_on_loopback(tmp_path):
    proc, calls = _node(tmp_path, NNODES="1", GPUS_TRAIN="4")
    assert proc.returncode == 0, proc.stderr
    serve = [c for c in calls if c.startswith("rollout-python")]
    train = [c for c in calls if c.startswith("trainer-python")]
    assert len(serve) == len(train) == 1 and "--host 127.0.0.1" in serve[0]
    key = serve[0].split("KEY=")[1].split()[0]
    assert len(key) == 64 and f"KEY={key} " in train[0]  # the same fresh key for both roles


@pytest.mark.parametrize(
    "script", sorted((REPO / "examples").glob("*/slurm.sbatch")), ids=lambda p: p.parent.name
)
def test_slurm_scripts_make_one_key_per_job(script, tmp_path):
    """Run the batch script with stand-in scontrol / srun: srun starts every node with one fresh job key."""
    out = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'h0\\nh1\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    _recorder(bin_dir / "srun", out)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_NODELIST": "h[0-1]",
    }
    env |= {"SLURM_NNODES": "2", "SLURM_JOB_ID": "7"}
    runs = [subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    keys = [line.split("KEY=")[1].split()[0] for line in _read(out).splitlines()]
    assert len(keys) == 2 and all(len(k) == 64 for k in keys) and keys[0] != keys[1]  # fresh per job


def test_launcher_passes_the_keys_to_every_server_router_and_client():
    launcher = EngineLauncher(
        "m",
        servers=2,
        tp=1,
        backend="sglang",
        router=True,
        api_key="user",
        admin_api_key="admin",
        host="0.0.0.0",
    )
    for i in range(2):
        cmd, env = launcher._server_cmd(i)
        assert cmd[cmd.index("--api-key") + 1] == "user" and cmd[cmd.index("--admin-api-key") + 1] == "admin"
        assert env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "0"
    router = launcher._router_cmd()
    assert router[router.index("--api-key") + 1] == "user" and "--admin-api-key" not in router
    local = EngineLauncher("m", backend="local", api_key="user")
    cmd, _ = local._server_cmd(0)
    assert cmd[cmd.index("--api-key") + 1] == "user" and "--admin-api-key" not in cmd
    for client in [*launcher.engines(), launcher.router_engine()]:
        assert client._auth_header("/generate") == {"Authorization": "Bearer user"}
        assert client._auth_header("/pause_generation") == {"Authorization": "Bearer admin"}


def test_launcher_refuses_a_network_bind_without_a_key():
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without --api-key"):
        EngineLauncher("m", backend="local", host="0.0.0.0")


def test_trainer_reads_the_key_from_the_named_variable(monkeypatch):
    from megatron_m2po.config import Config

    cfg = Config()
    cfg.rollout.engine, cfg.rollout.urls = "sglang", ["http://127.0.0.1:1"]
    cfg.rollout.api_key_env = "MY_JOB_KEY"
    monkeypatch.setenv("MY_JOB_KEY", "from-env")
    monkeypatch.delenv("M2PO_ADMIN_API_KEY", raising=False)
    (engine,) = build_engines(cfg, "m", None)
    assert engine._auth_header("/flush_cache") == {"Authorization": "Bearer from-env"}


def test_launched_cpu_server_requires_the_key(tmp_path):
    """A real engine server process started by the launcher: the launcher's client works, a bare call is 401."""
    hf_dir = make_tiny_model("qwen3", tmp_path / "tiny", seed=3)

    async def run(launcher):
        (client,) = launcher.engines()
        samples = await client.generate("p", [5, 6, 7], 2, SamplingParams(max_new_tokens=3))
        await client.pause()
        await client.resume()
        async with aiohttp.ClientSession() as http:
            async with http.post(launcher.urls[0] + "/generate", json={"input_ids": [5]}) as bare:
                bare_status = bare.status
            async with http.post(
                launcher.urls[0] + "/pause_generation", json={}, headers={"Authorization": "Bearer user"}
            ) as user_on_control:
                control_status = user_on_control.status
        await client.close()
        return samples, bare_status, control_status

    with EngineLauncher(
        hf_dir, backend="local", api_key="user", admin_api_key="admin", log_dir=tmp_path
    ) as launcher:
        samples, bare_status, control_status = asyncio.run(run(launcher))
    assert [len(s.response_ids) for s in samples] == [3, 3]
    assert bare_status == 401 and control_status == 401


def test_engines_cli_names_the_missing_key_variable(monkeypatch):
    from megatron_m2po.commands.m2po import main

    monkeypatch.delenv("M2PO_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="set M2PO_API_KEY"):
        main(["engines", "--model", "m", "--host", "0.0.0.0", "--backend", "local"])
