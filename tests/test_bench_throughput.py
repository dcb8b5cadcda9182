"""bench/mfu.py and bench/packing.py run end to end in their small CPU modes (the figures need a real run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_mfu_small_mode_runs_the_trainer_update(tmp_path):
    out = tmp_path / "mfu.json"
    proc = _run("bench.mfu", "--small", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert [r["model"] for r in results] == ["small", "small-moe"]  # dense, and a Qwen3-MoE layer stack
    for result in results:
        assert result["budget"] == 256
        assert result["tokens_per_s"] > 0 and math.isfinite(result["loss"])  # a finite step happened
        assert result["mfu"] is None  # no GPU peak on CPU: the figure stays open


@pytest.mark.slow
def test_packing_bench_quick_mode_reports_a_ratio():
    proc = _run("bench.packing", "--scale", "0.05", "--sequences", "16", "--reps", "1", "--layers", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert result["real_tokens"] < result["padded_tokens"] and result["ratio"] > 0
