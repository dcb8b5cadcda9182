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
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    # on_policy runs only at s = 0; m2po at both
    assert [(r["loss"], r["staleness"]) for r in rows] == [("on_policy", "0"), ("m2po", "0"), ("m2po", "2")]
    for r in rows:
        assert 0.0 <= float(r["final_accuracy"]) <= 1.0
        assert [int(p.split(":")[0]) for p in r["curve"].split()] == [0, 3]
    assert float(rows[0]["staleness_mean"]) == 0.0 and float(rows[2]["staleness_mean"]) > 0.0
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| loss | s |") and len(table) == 2 + 3
    assert (out / "accuracy.png").stat().st_size > 5_000
