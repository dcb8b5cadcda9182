"""examples/staleness_sweep: a smoke run of the sweep and the calibration (tiny settings, a few steps),
and the rules they apply (steady phase, run length, lr selection) on exact inputs."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "examples" / "staleness_sweep"
sys.path.insert(0, str(SCRIPTS))
import calibrate  # noqa: E402
import sweep  # noqa: E402

ENV = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
TINY = ["--quick", "--steps", "3", "--eval-every", "3", "--eval-prompts", "10", "--heldout", "20"]


def script(name: str, *args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_smoke(tmp_path):
    out, results = tmp_path / "work", tmp_path / "results"
    cmd = [
        "--out", str(out), "--results", str(results), *TINY,
        "--losses", "on_policy", "m2po", "--staleness", "0", "2", "--seeds", "0",
        "--lr", "2e-5", "--weight-decay", "0.01", "--jobs", "2",
    ]  # fmt: skip
    script("sweep.py", *cmd)
    rows = read_csv(results / "sweep.csv")
    # s = 0 is the on-policy run (every loss is the same gradient there); m2po runs at s > 0
    assert [(r["loss"], r["staleness"]) for r in rows] == [("on_policy", "0"), ("m2po", "2")]
    for r in rows:
        assert (float(r["lr"]), float(r["weight_decay"]), int(r["steps"])) == (2e-5, 0.01, 3)
        assert 0.0 <= float(r["final_accuracy"]) <= 1.0
        assert [int(p.split(":")[0]) for p in r["curve"].split()] == [0, 3]
        # training curves binned over 32 updates: 3 updates make one bin
        assert [p.split(":")[0] for p in r["zeroed_curve"].split()] == ["32"]
        assert float(r["m2_curve"].split(":")[1]) == pytest.approx(float(r["m2_before"]))
    assert float(rows[0]["staleness_mean"]) == 0.0 and float(rows[1]["staleness_mean"]) > 0.0
    assert float(rows[0]["m2_before"]) < 1e-9  # s = 0: the behaviour policy is the trained one
    assert 0.0 <= float(rows[1]["confident_fraction"]) <= 1.0 and float(rows[1]["m2_before_unconfident"]) >= 0
    # m2po at s = 2 over 3 updates: update 3 is the steady phase, its M2 read back from the record
    record = results / "runs" / rows[1]["run"]
    curves = sweep.read_curves(record / "curves.csv")
    assert [int(c["step"]) for c in curves] == [0, 1, 2, 3]
    # the warm-start phase: update u trains on data u - 1 updates old; then every batch is s old
    assert [c["staleness"] for c in curves[1:]] == [0.0, 1.0, 2.0]
    assert float(rows[1]["m2_before_steady"]) == pytest.approx(curves[3]["m2_before"], rel=1e-5)
    assert json.loads((record / "summary.json").read_text())["settings"]["lr"] == 2e-5
    table = (results / "sweep.md").read_text().splitlines()
    assert "20 held-out problems" in table[0]
    assert table[2].startswith("| lr | weight decay | updates | loss | s |") and table[4 + 2] == ""
    # the analysis table: where M2 sits, a row per stale run (on_policy's ratios are all 1)
    where = [i for i, line in enumerate(table) if line.startswith("Where M2 sits")]
    assert where == [7] and table[9].startswith("| lr | loss | s | T with p > 0.99 (%) |")
    assert len(table) == 12 and table[11].startswith("| 2e-05 | m2po | 2 |")
    assert (results / "sweep_lr2e-05_wd0.01_n3_accuracy.png").stat().st_size > 5_000
    assert (results / "sweep_lr2e-05_wd0.01_n3_by_staleness.png").stat().st_size > 5_000

    # resume from the records alone: the runs' events gone, the same command trains nothing again
    shutil.rmtree(out / "runs")
    again = script("sweep.py", *cmd)
    assert again.stderr.count("already done, reused") == 2
    assert read_csv(results / "sweep.csv") == rows
    assert not (out / "runs").exists()

    # a record made with other settings is refused, naming the file
    other = subprocess.run(
        [sys.executable, str(SCRIPTS / "sweep.py"), *cmd, "train.grad_clip=0.5"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV,
    )  # fmt: skip
    assert other.returncode == 1 and "summary.json: this run was made with other settings" in other.stderr

    # a fresh clone: --report with no --out rebuilds the tables and plots from the committed records
    clone = tmp_path / "clone"
    shutil.copytree(results / "runs", clone / "docs_results" / "runs")
    script("sweep.py", "--report", "--results", str(clone / "docs_results"), cwd=clone)
    assert read_csv(clone / "docs_results" / "sweep.csv") == rows
    assert (clone / "docs_results" / "sweep.md").read_text() == (results / "sweep.md").read_text()
    assert (clone / "docs_results" / "sweep_lr2e-05_wd0.01_n3_by_staleness.png").is_file()
    assert not (clone / "runs").exists()  # no work dir, no warm start: the records were enough

    # the calibration in a tiny setting: m2po at s = 2 for two lrs, 4 updates, bins of 1 update
    calib = [
        "--out", str(out), "--results", str(results), *TINY, "--steps", "4",
        "--staleness", "2", "--lrs", "1e-5", "2e-5", "--bin", "1", "--jobs", "2",
    ]  # fmt: skip
    proc = script("calibrate.py", *calib)
    bins = read_csv(results / "calibration.csv")
    assert [(r["lr"], r["phase"], r["first_update"]) for r in bins] == [
        (lr, phase, str(u)) for lr in ("1e-05", "2e-05") for phase, u in [("first", 1), ("first", 2)] + [
            ("steady", 3), ("steady", 4)]
    ]  # fmt: skip
    assert [float(r["staleness_mean"]) for r in bins[:4]] == [0.0, 1.0, 2.0, 2.0]
    for r in bins:
        assert float(r["m2_before"]) >= 0 and 0.0 <= float(r["masked_fraction"]) <= 1.0
        assert 0.0 <= float(r["confident_fraction"]) <= 1.0
    summary = (results / "calibration.md").read_text()
    assert summary.startswith("Selection rule (fixed before the runs)") and "| 1e-05 |" in summary
    assert "Chosen:" in proc.stdout
    assert len(list((results / "calibration_runs").glob("*/summary.json"))) == 2
    assert len(read_csv(results / "sweep.csv")) == 2  # calibration runs stay out of the sweep's table


@given(st.lists(st.tuples(st.integers(1, 600), st.floats(0, 1)), max_size=40), st.integers(0, 300))
@example([(1, 0.5), (2, 0.2), (3, 0.1)], 2)
@example([], 0)
def test_steady_mean_is_over_the_updates_after_s(points, s):
    steady = [v for step, v in points if step > s]
    got = sweep.steady_mean(points, s)
    assert math.isnan(got) if not steady else got == pytest.approx(sum(steady) / len(steady))


def test_run_length_rule():
    steps = list(range(0, 2049, 64))
    rising = [min(0.97, 0.6 + 0.0005 * x) for x in steps]  # gains 0.032 per 64 updates until 740
    # at 832 the next 256 updates average 0.970, the last 256 0.953 (+1.7); at 896, 0.970 vs 0.966
    assert sweep.plateau_length(steps, rising, window=256) == 896
    assert sweep.plateau_length(steps, [0.5 + 0.0001 * x for x in steps], window=256) is None  # +2.6/256
    assert sweep.plateau_length(steps[:4], rising[:4], window=256) is None  # too short to tell


@given(st.dictionaries(st.sampled_from([1e-6, 5e-6, 1e-5, 2e-5, 1e-4]), st.floats(0, 1), min_size=1))
@example({1e-5: 0.03, 2e-5: 0.05})
@example({1e-5: 0.04, 2e-5: 0.04})
@example({1e-5: 0.2, 2e-5: 0.3})
def test_selection_is_the_largest_lr_within_tau(steady):
    chosen = calibrate.select_lr(steady, tau=0.04)
    within = [lr for lr, m2 in steady.items() if m2 <= 0.04]
    assert chosen == (max(within) if within else None)
    if chosen is not None:
        assert all(m2 > 0.04 for lr, m2 in steady.items() if lr > chosen)


def test_phase_bins_split_at_s():
    curves = [{"step": 0, "accuracy": 0.5}] + [
        {"step": u, "staleness": min(u, 3), "m2_before": u / 10, "masked_fraction": 0.0} for u in range(1, 8)
    ]
    bins = calibrate.phase_bins(curves, s=3, width=2)
    assert [(b["phase"], b["first_update"], b["last_update"]) for b in bins] == [
        ("first", 1, 2), ("first", 3, 3), ("steady", 4, 5), ("steady", 6, 7)
    ]  # fmt: skip
    assert [b["m2_before"] for b in bins] == pytest.approx([0.15, 0.3, 0.45, 0.65])
    assert [b["staleness_mean"] for b in bins] == [1.5, 3.0, 3.0, 3.0]
    assert all(math.isnan(b["confident_fraction"]) for b in bins)  # not in these curves: not made up


def test_a_bad_curves_file_names_its_row(tmp_path):
    path = tmp_path / "curves.csv"
    path.write_text("step,m2_before\n1,0.1\n2,oops\n")
    with pytest.raises(ValueError, match=r"curves.csv, row 3"):
        sweep.read_curves(path)


def test_a_killed_run_continues_only_with_its_own_settings(tmp_path):
    settings = {"loss": "m2po", "staleness": 4, "lr": 1e-5, "steps": 512}
    run_dir = tmp_path / "m2po_s4"
    assert sweep.resumable(run_dir, settings) is None  # never started
    run_dir.mkdir()
    (run_dir / "sweep_settings.json").write_text(json.dumps(settings))
    assert sweep.resumable(run_dir, settings) is None  # killed before its first checkpoint
    for step in (128, 256):
        (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    assert sweep.resumable(run_dir, settings) == 256
    assert sweep.resumable(run_dir, settings | {"lr": 2e-5}) is None  # another run's dir: start over
    (run_dir / "sweep_settings.json").write_text("{not json")
    assert sweep.resumable(run_dir, settings) is None


def test_a_stopped_runs_curve_is_recorded_and_sets_the_run_length(tmp_path, capsys):
    """A run stopped part way (`--snapshot`, or a failed train) leaves curves.csv + progress.json: the tables
    skip it, `--run-length` reads it, and finishing the run replaces it with the finished record."""
    from torch.utils.tensorboard import SummaryWriter

    settings = {
        "loss": "on_policy",
        "staleness": 0,
        "seed": 0,
        "lr": 1e-5,
        "weight_decay": 0.01,
        "steps": 2048,
    }
    out, records = tmp_path / "work", tmp_path / "results" / "runs"
    name = sweep.run_name("on_policy", 0, 0, 1e-5, 0.01, 2048)
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "sweep_settings.json").write_text(json.dumps(settings))
    # the lr 1e-5 run's held-out curve as it stood when it was stopped (evaluations every 64 updates)
    curve = [
        0.263,
        0.323,
        0.337,
        0.367,
        0.377,
        0.377,
        0.393,
        0.383,
        0.38,
        0.387,
        0.41,
        0.397,
        0.397,
        0.38,
        0.39,
    ]
    with SummaryWriter(str(run_dir / "tb")) as writer:
        for i, accuracy in enumerate(curve):
            writer.add_scalar("eval/accuracy", accuracy, 64 * i)
    finished = out / "runs" / "calibration_run"  # exported its policy: finished, recorded elsewhere
    (finished / "hf").mkdir(parents=True)
    (finished / "sweep_settings.json").write_text(json.dumps(settings))

    assert sweep.snapshot(out, records) == [name]
    progress = json.loads((records / name / "progress.json").read_text())
    assert progress["settings"] == settings and progress["reached_step"] == 896
    assert sweep.load_records(records) == []  # unfinished: not in the tables
    # (384, 640] averages 0.390, (640, 896] 0.391: the first window gaining under a point
    assert sweep.print_run_length(records, 1e-5, 0.01, window=256) == 0
    assert capsys.readouterr().out.strip() == (
        f"{name} (unfinished, evaluated to update 896): plateau at update 640; run length 640"
    )
    assert sweep.print_run_length(records, 1e-4, 0.0, window=256) == 1  # no record at that lr

    sweep.write_record(records / name, settings, {"seconds": 1, "final_accuracy": 0.4, "start_accuracy": 0.27},
                       sweep.read_curves(records / name / "curves.csv"))  # fmt: skip
    assert not (records / name / "progress.json").exists()
    assert sweep.snapshot(out, records) == []  # finished: left as it is


def test_the_records_are_not_ignored_by_git():
    """`git add docs/results` must pick the run records up (a `runs/` ignore rule once hid them)."""
    for path in ("docs/results/runs/a_run/summary.json", "docs/results/calibration_runs/a_run/curves.csv"):
        check = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, capture_output=True)
        assert check.returncode == 1, f"{path} is ignored by git"
    assert subprocess.run(["git", "check-ignore", "-q", "runs/staleness_sweep"], cwd=REPO).returncode == 0
