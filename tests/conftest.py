"""Shared test fixtures: markers that skip without a GPU, a torchrun launcher, a tiny model per session."""

from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Arm a watchdog for the interpreter's exit: a thread, executor or child left blocked by a test would
    otherwise keep the finished run alive until CI's own limit, with no trace of where. After 120 s every
    thread's stack goes to stderr and the process exits 1."""
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this checkout first on PYTHONPATH (what was there stays after it)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def torchrun_prefix(nproc: int) -> list[str]:
    """`torchrun --nproc-per-node=nproc` on a free local port; append the script (or `-m module`) and args."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "--master-addr=127.0.0.1",
    ]


def run_torchrun(
    script: str | Path, nproc: int, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes (gloo); fail the test with its output on error."""
    cmd = [*torchrun_prefix(nproc), str(script), *map(str, args)]
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


@pytest.fixture()
def single_process():
    """A one-rank process group and Megatron parallel state for the test, torn down after it."""
    from megatron_m2po import platform

    torch.set_num_threads(1)
    platform.init_distributed()
    yield
    platform.destroy_distributed()
