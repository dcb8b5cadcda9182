"""examples/staleness_sweep: a smoke run of the sweep harness (two settings, a few steps)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def test_sweep_smoke(tmp_path):
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(REPO / "examples" / "staleness_sweep" / "sweep.py"),
        "--out",
        str(out),
        "--quick",
        "--losses",
        "on_policy",
        "m2po",
        "--staleness",
        "0",
        "2",
        "--seeds",
        "0",
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--eval-prompts",
        "10",
        "--heldout",
        "20",
        "--jobs",
        "2",
    ]
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

    def sweep() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)

    proc = sweep()
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    # s = 0 is the on-policy run (every loss is the same gradient there); m2po runs at s > 0
    assert [(r["loss"], r["staleness"]) for r in rows] == [("on_policy", "0"), ("m2po", "2")]
    for r in rows:
        assert 0.0 <= float(r["final_accuracy"]) <= 1.0
        assert [int(p.split(":")[0]) for p in r["curve"].split()] == [0, 3]
    assert float(rows[0]["staleness_mean"]) == 0.0 and float(rows[1]["staleness_mean"]) > 0.0
    # training curves binned over 32 updates: 3 updates make one bin
    for r in rows:
        assert [p.split(":")[0] for p in r["zeroed_curve"].split()] == ["32"]
        assert float(r["m2_curve"].split(":")[1]) == pytest.approx(float(r["m2_before"]))
    assert float(rows[0]["m2_before"]) < 1e-9  # s = 0: the behaviour policy is the trained one
    table = (out / "results.md").read_text().splitlines()
    assert "20 held-out problems" in table[0]
    assert table[2].startswith("| loss | s |") and len(table) == 4 + 2
    assert (out / "accuracy.png").stat().st_size > 5_000
    assert (out / "accuracy_by_staleness.png").stat().st_size > 5_000

    # rerunning the command reuses the finished runs instead of training them again
    again = sweep()
    assert again.returncode == 0, again.stderr[-5000:]
    assert again.stderr.count("already done, reused") == 2
    assert list(csv.DictReader((out / "results.csv").open())) == rows

    # --report rebuilds the same results from the finished runs alone
    report = subprocess.run(
        [*cmd, "--report"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert report.returncode == 0, report.stderr[-5000:]
    assert list(csv.DictReader((out / "results.csv").open())) == rows
