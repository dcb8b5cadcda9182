"""examples/staleness_sweep: a smoke run of the sweep harness (two settings, a few steps)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

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
