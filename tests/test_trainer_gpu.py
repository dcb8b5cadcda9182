"""On a GPU: the trainer trains in bf16 over NCCL with Megatron's mixed-precision optimizer, and a checkpoint
round trip reproduces the next update exactly (the CPU path is covered by tests/test_train_e2e.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port, subprocess_env


@pytest.mark.gpu
def test_bf16_update_and_checkpoint_round_trip_on_gpu(tmp_path):
    from megatron_m2po.models.tiny import make_tiny_model

    model = make_tiny_model("qwen3", tmp_path / "tiny")
    out = tmp_path / "out.json"
    # Not conftest.run_torchrun: it hides the CUDA devices (it is for the CPU tests).
    script = REPO / "tests" / "dist" / "trainer_checkpoint_roundtrip.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=1",
        f"--master-port={free_port()}",
        str(script),
        str(model),
        str(out),
        str(tmp_path / "ckpt"),
    ]
    env = subprocess_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    r = json.loads(out.read_text())
    assert r["dtype"] == "torch.bfloat16" and r["device"].startswith("cuda")
    assert all(math.isfinite(loss) and gnorm > 0 for loss, gnorm in r["first"])
    assert r["after"] == r["before"]
