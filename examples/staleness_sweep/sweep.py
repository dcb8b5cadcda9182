"""Staleness sweep on the CPU toy task (issues 7, 12): losses x staleness s x seeds x lr, fixed-lag protocol.

    python examples/staleness_sweep/sweep.py --jobs 2 --lr 1e-5 --weight-decay 0.01   # the grid
    python examples/staleness_sweep/sweep.py --losses on_policy m2po --staleness 0 4 \\
        --seeds 0 --steps 50                                                        # a small one
    python examples/staleness_sweep/sweep.py --report      # tables + plots from docs/results/runs alone

Every run starts from the same warm-started tiny model of the CPU demo (built once under OUT/task) and
trains with the demo recipe (examples/cpu_demo/config.yaml: 16 prompts x 8 samples per update, one
update per step) in `fixed` mode with K = s batches in the FIFO, so every batch is exactly s optimizer
updates old (the paper's protocol; s = 0 is `sync`). The first s updates train on the warm start's
own samples (update u on data u - 1 updates old: the warm-start phase); every later batch is exactly s
updates old (the steady phase). At s = 0 every importance ratio is 1 and every loss computes the
on-policy gradient, so s = 0 is run once, as `on_policy`, and the other losses run at every s > 0. Each
run is a separate `python -m megatron_m2po train` process (`--jobs` at a time) working under
OUT/runs/<run>.

What lasts is the run's record, RESULTS/runs/<run>/ (RESULTS defaults to docs/results, committed):
summary.json (settings, scalar results) and curves.csv (per update: staleness, M2 before masking, masked
and clipped token fractions, the share of trust-region tokens sampled with p > 0.99 and M2 over the rest;
held-out accuracy at each evaluation). A setting whose record exists is
reused, so a sweep resumes on any machine from a fresh clone (an unfinished run starts over), and
`--report` rebuilds everything from the records alone, without OUT.

Writes RESULTS/sweep.csv (one row per run of every regime: lr, weight decay and updates are columns),
RESULTS/sweep.md (mean +- std over seeds) and per regime RESULTS/sweep_<regime>_accuracy.png (held-out
accuracy vs updates, a panel per loss, a line per s) and RESULTS/sweep_<regime>_by_staleness.png (a
column per s, a line per loss, on-policy in every panel: the paper's comparison), and for the grid's
records RESULTS/sweep_<regime>_by_seed.png (a column per seed: each run's own curves).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from grid import plateau_length, write_grid

from megatron_m2po.data.arithmetic import SPLITS

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "cpu_demo" / "config.yaml"
RESULTS = REPO / "docs" / "results"
LOSSES = ("on_policy", "grpo", "grpo_noclip", "m2po", "m2po_clip")
STALENESS = (0, 4, 16, 64, 256)
TAU = 0.04  # the M2 budget of the recipe and the paper
# The sweep's own warm starts (supervised, 64 problems per step, stopped at the first check, every
# `check_every` steps, whose greedy accuracy on the 200 validation problems reaches `target`, or at
# `max_steps`), fixed here so that tuning the demo's warm start does not change the starting point of a
# sweep continued on another machine. `short` is the demo's of 2026-11-25. `long` trains on to 0.42
# validation accuracy, checked every 10 steps because accuracy jumps within 50 (0.28 -> 0.70 from step 900
# to 950 on the split by fact): a stronger start chosen by the validation target alone, never by held-out
# or RL results. The checks consume no randomness, so both follow one supervised trajectory.
WARM_STARTS = {
    "short": {"lr": 3e-3, "max_steps": 1500, "target": 0.3, "check_every": 50},
    "long": {"lr": 3e-3, "max_steps": 8000, "target": 0.42, "check_every": 10},
}
# The settings of a record made before the split and the warm start were options.
LEGACY = {"split": "problem", "warm_start": "short"}
# per-update columns of a record's curves.csv (accuracy only on evaluation rows, empty elsewhere)
CURVE_FIELDS = (
    "step",
    "staleness",
    "m2_before",
    "masked_fraction",
    "clip_fraction",
    "confident_fraction",
    "m2_before_unconfident",
    "reward",
    "entropy",
    "grad_norm",
    "accuracy",
)
CURVE_TAGS = {
    "staleness": "train/staleness_mean",
    "m2_before": "loss/m2_before",
    "masked_fraction": "loss/masked_fraction",
    "clip_fraction": "loss/clip_fraction",
    "confident_fraction": "loss/confident_fraction",  # T tokens with mu > 0.99
    "m2_before_unconfident": "loss/m2_before_unconfident",  # M2 over the other T tokens
    "reward": "rollout/reward_mean",
    "entropy": "loss/entropy",
    "grad_norm": "train/grad_norm",
    "accuracy": "eval/accuracy",
}

logger = logging.getLogger("staleness_sweep")


def run_name(
    loss: str,
    s: int,
    seed: int,
    lr: float,
    weight_decay: float,
    steps: int,
    warm_start: str = LEGACY["warm_start"],
    split: str = LEGACY["split"],
) -> str:
    name = f"{loss}_s{s}_seed{seed}_lr{lr:g}_wd{weight_decay:g}_n{steps}"
    return (
        name
        if (split, warm_start) == (LEGACY["split"], LEGACY["warm_start"])
        else f"{name}_{warm_start}-{split}"
    )


def grid(losses, staleness, seeds, lrs=(None,)) -> list[tuple[str, int, int, float | None]]:
    """(loss, s, seed, lr) in run order: lr by lr, then seed by seed, so a sweep stopped early has
    whole comparisons."""
    return [
        (loss, s, seed, lr)
        for lr in lrs
        for seed in seeds
        for loss in losses
        for s in staleness
        if (loss == "on_policy") == (s == 0)
    ]


def regime(row: dict) -> tuple[str, str, float, float, int]:
    """The settings that differ between regimes of the sweep: warm start, split, lr, weight decay, updates
    per run."""
    return row["warm_start"], row["split"], float(row["lr"]), float(row["weight_decay"]), int(row["steps"])


def regime_tag(key: tuple[str, str, float, float, int]) -> str:
    warm, split, lr, wd, steps = key
    tag = f"lr{lr:g}_wd{wd:g}_n{steps}"
    return tag if (split, warm) == (LEGACY["split"], LEGACY["warm_start"]) else f"{warm}-{split}_{tag}"


def table_order(row: dict) -> tuple:
    return (*regime(row), LOSSES.index(row["loss"]), int(row["staleness"]), int(row["seed"]))


def recipe_train(config: Path) -> dict:
    """The base recipe's train section (the lr and weight decay a sweep uses unless told otherwise)."""
    try:
        return yaml.safe_load(Path(config).read_text())["train"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise ValueError(f"{config}: cannot read its train section ({err})") from err


def heldout_correct(hf_dir: Path, heldout: Path, n: int) -> str:
    """Which of the first n held-out problems the model answers correctly, greedily (the demo's decoding),
    as a string of 0 and 1 in file order."""
    from megatron_m2po.commands.demo import MAX_NEW_TOKENS
    from megatron_m2po.data.arithmetic import DEMO_TEMPLATE
    from megatron_m2po.rollout.evaluation import FileSpec, evaluate
    from megatron_m2po.types import SamplingParams

    (result,) = evaluate(
        hf_dir,
        [FileSpec(heldout)],
        sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, seed=0),
        template=DEMO_TEMPLATE,
        max_prompts=n,
        concurrency=n,  # all in flight: the local engine decodes them as one batch
        reward_workers=1,
        threads=1,
        keep_responses=True,
    )
    return "".join("1" if r["correct"][0] else "0" for r in result.responses)


def accuracy_of(bits: str) -> float:
    return bits.count("1") / max(1, len(bits))


def prepare(
    out: Path, seed: int, heldout: int, quick: bool, split: str, warm_start: str
) -> tuple[Path, dict[str, Path], str]:
    """The demo's task files and warm-started model, built once per (split, warm start) and reused by every
    run, and the warm start's per-problem greedy correctness on all held-out problems (where every run
    starts from)."""
    from megatron_m2po.commands.demo import prepare_task, warm_start_model

    legacy = (split, warm_start) == (LEGACY["split"], LEGACY["warm_start"])
    task = out / ("task" if legacy else f"task-{warm_start}-{split}")
    warm = task / "warmstart"
    data, base = prepare_task(task, seed=seed, heldout=heldout, split=split)
    if not (warm / "config.json").is_file():
        limits = {"max_steps": 20, "check_every": 10, "target": 2.0} if quick else {}
        result = warm_start_model(base, warm, data, seed=seed, **(WARM_STARTS[warm_start] | limits))
        (task / "warmstart_sft.json").write_text(json.dumps(result, indent=1) + "\n")
    start_file = task / "warmstart_accuracy.json"
    start = json.loads(start_file.read_text()) if start_file.is_file() else {}
    if "correct" not in start:
        correct = heldout_correct(warm, data["heldout"], heldout)
        start_file.write_text(json.dumps({"accuracy": accuracy_of(correct), "correct": correct}))
    return warm, data, json.loads(start_file.read_text())["correct"]


def run_settings(loss: str, s: int, seed: int, lr: float, weight_decay: float, args) -> dict:
    """What defines a run, free of machine paths: a record made elsewhere with these is the same run."""
    config = Path(args.config).resolve()
    return {
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "loss": loss,
        "staleness": s,
        "seed": seed,
        "lr": lr,
        "weight_decay": weight_decay,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_prompts": args.eval_prompts,
        "heldout": args.heldout,
        "quick_warm_start": bool(args.quick),
        "overrides": list(args.overrides),
        "split": args.split,
        "warm_start": args.warm_start,
    }


def run_overrides(warm: Path, data: dict[str, Path], run_dir: Path, settings: dict) -> list[str]:
    """The `section.key=value` list that turns the base recipe into one run."""
    s = settings["staleness"]
    mode = (
        ["staleness.mode=sync", "staleness.fixed_lag_steps=0"]
        if s == 0
        else ["staleness.mode=fixed", f"staleness.fixed_lag_steps={s}"]
    )
    return [
        f"model.path={warm}",
        f"data.path={data['train']}",
        f"eval.path={data['heldout']}",
        f"logging.run_dir={run_dir}",
        "logging.reuse_run_dir=true",  # the run dir also holds the sweep's own sweep_settings.json
        f"algorithm.loss={settings['loss']}",
        *mode,
        f"train.seed={settings['seed']}",
        f"train.steps={settings['steps']}",
        f"train.lr={settings['lr']}",
        f"train.weight_decay={settings['weight_decay']}",
        f"eval.every={settings['eval_every']}",
        f"eval.max_prompts={settings['eval_prompts']}",
        f"staleness.queue_capacity={16 * (s + 2)}",
        "checkpoint.save_at_end=false",
        "checkpoint.save_every=128",  # a killed run continues from its newest checkpoint (resumable)
        "logging.console=none",
        "logging.level=WARNING",
        *settings["overrides"],
    ]


def git_commit() -> str:
    """The checkout's commit, recorded with each run ("unknown" outside a git checkout)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        )
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


def run_one(out: Path, records: Path, task, setting: tuple, args) -> dict:
    """Train one setting, or reuse its record under `records`, and return its results row; the final
    accuracy is the exported policy's on every held-out problem (the curve uses the first --eval-prompts)."""
    loss, s, seed, lr = setting
    settings = run_settings(loss, s, seed, lr, args.weight_decay, args)
    name = run_name(loss, s, seed, lr, args.weight_decay, args.steps, args.warm_start, args.split)
    record = records / name
    if (record / "summary.json").is_file():
        summary = json.loads((record / "summary.json").read_text())
        if LEGACY | summary["settings"] != settings:
            raise ValueError(
                f"{record / 'summary.json'}: this run was made with other settings ({summary['settings']}); "
                "use another --results for a different sweep"
            )
        logger.info("%s already done, reused", name)
        return load_record(record)
    warm, data, start_correct = task()
    run_dir = out / "runs" / name
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (out / "runs" / f"{name}.lock").open("w") as lock:
        try:  # the train process inherits the lock: held while either this process or it lives
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"{run_dir}: another process is training this run (lock {lock.name})"
            ) from None
        return train_one(out, record, run_dir, settings, warm, data, start_correct, lock, args)


def train_one(out, record, run_dir, settings, warm, data, start_correct, lock, args) -> dict:
    """Train (or continue) one run under `run_dir`, holding `lock`, then write its record."""
    name = run_dir.name
    resume = resumable(run_dir, settings)
    if resume is None and run_dir.exists():  # killed before its first checkpoint, or other settings
        shutil.rmtree(run_dir)
    if resume is not None:
        logger.info("%s: continuing from its checkpoint at step %d", name, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "sweep_settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    overrides = run_overrides(warm, data, run_dir, settings)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    with (run_dir / "train.log").open("a") as log:  # on disk: a sweep killed part way leaves it
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_m2po",
                "train",
                "--config",
                str(args.config),
                *(["--resume"] if resume is not None else []),
                *overrides,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            pass_fds=(lock.fileno(),),
        )
    if proc.returncode != 0:
        write_progress(record, settings, run_dir)
        tail = (run_dir / "train.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"run {name} failed ({proc.returncode}; log {run_dir / 'train.log'}):\n{tail}")
    final = heldout_correct(run_dir / "hf", data["heldout"], args.heldout)
    seconds = time.perf_counter() - start
    results = {
        "seconds": round(seconds),
        "final_accuracy": accuracy_of(final),
        "start_accuracy": accuracy_of(start_correct),
    }
    if resume is not None:  # `seconds` is this process's share only
        results["resumed_from_step"] = resume
    write_record(
        record, settings, results, curves_from_events(run_dir), evaluations(run_dir, start_correct, final)
    )
    row = load_record(record)
    logger.info("%s done in %.0fs: final accuracy %.3f", name, seconds, row["final_accuracy"])
    return row


def resumable(run_dir: Path, settings: dict) -> int | None:
    """The step of the checkpoint a killed run of these same settings left in `run_dir` (train.py --resume
    continues it exactly), or None: no checkpoint, or the run dir belongs to other settings."""
    try:
        same = json.loads((run_dir / "sweep_settings.json").read_text()) == settings
    except (OSError, ValueError):
        return None
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    return int(steps[-1].name.removeprefix("step_")) if same and steps else None


def curves_from_events(run_dir: Path) -> list[dict]:
    """The run's per-update curves (CURVE_FIELDS) from its TensorBoard events."""
    from megatron_m2po.metrics import read_scalars

    series = read_scalars(run_dir)
    if "eval/accuracy" not in series:
        raise ValueError(f"{run_dir}: no eval/accuracy in its TensorBoard events")
    by_step: dict[int, dict] = {}
    for field, tag in CURVE_TAGS.items():
        for step, value in series.get(tag, []):
            by_step.setdefault(int(step), {"step": int(step)})[field] = value
    return [by_step[step] for step in sorted(by_step)]


def write_curves(path: Path, curves: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, restval="")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if k != "step" else v) for k, v in c.items()} for c in curves)


def evaluations(run_dir: Path, start: str | None = None, final: str | None = None) -> list[tuple[str, str]]:
    """(evaluation, per-problem bits) of a run: `start` (the warm start on all held-out problems), each
    evaluation during training by its update (the first --eval-prompts problems), `final` (the exported
    policy on all of them)."""
    from megatron_m2po.rollout.producer import EVAL_RECORD, read_eval_record

    path = run_dir / EVAL_RECORD
    during = sorted(read_eval_record(path).items()) if path.is_file() else []
    return [
        *([("start", start)] if start is not None else []),
        *((str(version), bits) for version, bits in during),
        *([("final", final)] if final is not None else []),
    ]


def write_correct(path: Path, rows: list[tuple[str, str]]) -> None:
    """A record's correct.csv: per evaluation, how many problems and which were answered correctly."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["evaluation", "problems", "correct"])
        writer.writerows((name, len(bits), bits) for name, bits in rows)


def read_correct(path: Path) -> dict[str, str]:
    """evaluation -> bits from a record's correct.csv ({} for a record made before it existed); a bad row
    is named."""
    if not path.is_file():
        return {}
    out = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            bits = row.get("correct") or ""
            if set(bits) - {"0", "1"} or str(len(bits)) != row.get("problems"):
                raise ValueError(f"{path}, row {line}: not 'evaluation,problems,bits' with that many bits")
            out[row["evaluation"]] = bits
    return out


def write_record(
    record: Path, settings: dict, results: dict, curves: list[dict], correct: list[tuple[str, str]] = ()
) -> None:
    """RESULTS/runs/<run>/{curves.csv, correct.csv, summary.json}; summary.json last, and atomically: it
    marks the record finished."""
    record.mkdir(parents=True, exist_ok=True)
    write_curves(record / "curves.csv", curves)
    if correct:
        write_correct(record / "correct.csv", list(correct))
    summary = {"settings": settings, "results": results, "commit": git_commit()}
    tmp = record / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(record / "summary.json")
    (record / "progress.json").unlink(missing_ok=True)


def write_progress(record: Path, settings: dict, run_dir: Path) -> None:
    """An unfinished run's record: its curves so far and progress.json (no summary.json), so a stopped
    run's curve is committed with the finished ones (`--run-length` reads it; the tables do not)."""
    try:
        curves = curves_from_events(run_dir)
    except (OSError, ValueError):  # stopped before its first evaluation: nothing worth keeping
        return
    record.mkdir(parents=True, exist_ok=True)
    write_curves(record / "curves.csv", curves)
    correct = evaluations(run_dir)
    if correct:
        write_correct(record / "correct.csv", correct)
    progress = {"settings": settings, "reached_step": curves[-1]["step"], "commit": git_commit()}
    (record / "progress.json").write_text(json.dumps(progress, indent=1) + "\n")


def snapshot(out: Path, records: Path) -> list[str]:
    """Write the record of every unfinished run under `out`/runs (see write_progress); their names."""
    written = []
    for settings_file in sorted((out / "runs").glob("*/sweep_settings.json")):
        record = records / settings_file.parent.name
        if not (record / "summary.json").is_file() and not (settings_file.parent / "hf").is_dir():
            write_progress(record, json.loads(settings_file.read_text()), settings_file.parent)
            written += [record.name] if (record / "progress.json").is_file() else []
    return written


def read_curves(path: Path) -> list[dict]:
    """A record's curves.csv as dicts of floats (absent values left out); a bad cell names its row."""
    rows = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'step' column in its header")
        for line, raw in enumerate(reader, start=2):
            try:
                rows.append(
                    {k: float(v) for k, v in raw.items() if k in CURVE_FIELDS and v not in ("", None)}
                )
            except ValueError as err:
                raise ValueError(f"{path}, row {line}: {err}") from err
    return rows


def series(curves: list[dict], field: str) -> list[tuple[int, float]]:
    return [(int(c["step"]), c[field]) for c in curves if field in c]


def steady_mean(points: list[tuple[int, float]], s: int) -> float:
    """Mean over the steady phase, the updates after the first s (NaN if the run never got there)."""
    values = [v for step, v in points if step > s]
    return statistics.fmean(values) if values else math.nan


def load_record(record: Path) -> dict:
    """A record's results row: its settings and results, and the means and curves drawn from curves.csv."""
    try:
        summary = json.loads((record / "summary.json").read_text())
        settings, results = LEGACY | summary["settings"], summary["results"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{record / 'summary.json'}: not a finished run's record ({err!r})") from err
    curves = read_curves(record / "curves.csv")
    accuracy = series(curves, "accuracy")
    if not accuracy:
        raise ValueError(f"{record / 'curves.csv'}: no held-out accuracy")

    def mean(field: str) -> float:
        values = [v for _, v in series(curves, field)]
        return statistics.fmean(values) if values else math.nan

    masked, clipped = dict(series(curves, "masked_fraction")), dict(series(curves, "clip_fraction"))
    zeroed = [(step, masked.get(step, 0.0) + clipped.get(step, 0.0)) for step in sorted({*masked, *clipped})]
    m2 = series(curves, "m2_before")
    s = int(settings["staleness"])
    return {
        "run": record.name,
        **{
            k: settings[k]
            for k in ("loss", "staleness", "seed", "lr", "weight_decay", "steps", "warm_start", "split")
        },
        "final_accuracy": results["final_accuracy"],
        "best_accuracy": max(v for _, v in accuracy),
        "masked_fraction": mean("masked_fraction"),
        "clip_fraction": mean("clip_fraction"),
        "masked_fraction_steady": steady_mean(sorted(masked.items()), s),
        "clip_fraction_steady": steady_mean(sorted(clipped.items()), s),
        "m2_before": mean("m2_before"),
        "m2_before_steady": steady_mean(m2, s),
        "confident_fraction": mean("confident_fraction"),
        "m2_before_unconfident": mean("m2_before_unconfident"),
        "staleness_mean": mean("staleness"),
        "seconds": results["seconds"],
        "start_accuracy": results["start_accuracy"],
        "heldout": settings["heldout"],
        "commit": summary.get("commit", "unknown"),
        "curve": format_curve(accuracy),
        "zeroed_curve": format_curve(binned(zeroed)),
        "m2_curve": format_curve(binned(m2)),
        "reward_curve": format_curve(binned(series(curves, "reward"))),
        "entropy_curve": format_curve(binned(series(curves, "entropy"))),
        "grad_norm_curve": format_curve(binned(series(curves, "grad_norm"))),
    }


def load_records(records: Path) -> list[dict]:
    """The rows of every finished record under `records` (a record without summary.json is skipped)."""
    return [load_record(done.parent) for done in sorted(records.glob("*/summary.json"))]


def format_curve(points) -> str:
    return " ".join(f"{step:g}:{value:.6g}" for step, value in points)


def parse_curve(text: str) -> dict[float, float]:
    return dict(tuple(map(float, point.split(":"))) for point in text.split())


def binned(points: list[tuple[int, float]], width: int = 32) -> list[tuple[int, float]]:
    """Means over consecutive `width`-update windows, each placed at its window's last update."""
    bins: dict[int, list[float]] = {}
    for step, value in points:
        bins.setdefault((step - 1) // width, []).append(value)
    return [((b + 1) * width, statistics.fmean(v)) for b, v in sorted(bins.items())]


def write_table(rows: list[dict], path: Path) -> str:
    """Mean +- std over seeds per (regime, loss, s), under a line per regime's common starting point."""
    keys = sorted(
        {(*regime(r), r["loss"], int(r["staleness"])) for r in rows},
        key=lambda k: (*k[:5], LOSSES.index(k[5]), k[6]),
    )

    def stat(values: list[float], scale: float, digits: int) -> str:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return "-"
        m = statistics.fmean(values) * scale
        if len(values) == 1:
            return f"{m:.{digits}f}"
        return f"{m:.{digits}f} +- {statistics.stdev(values) * scale:.{digits}f}"

    starts = sorted(
        {(r["warm_start"], r["split"], float(r["start_accuracy"]), int(r["heldout"])) for r in rows}
    )
    lines = [
        "Every run starts from its warm start: "
        + ", ".join(
            f"{warm} on the {split} split {100 * a:.1f}% greedy accuracy on the {n} held-out problems"
            for warm, split, a, n in starts
        )
        + ". Final accuracy: the trained policy on all of them; best: the highest point of the accuracy "
        "curve during training. M2: mean (log r)^2 over the trust-region tokens before masking, over the "
        "whole run and over the steady phase (updates after the first s); masked and clipped token fractions "
        "likewise. Mean +- std over seeds; seconds: "
        "wall time per run (a resumed run's counts only its last stretch).",
        "",
        "| warm start | split | lr | weight decay | updates | loss | s | seeds | final held-out accuracy (%) "
        "| best (%) | masked tokens (%) | clipped tokens (%) | masked steady (%) | clipped steady (%) | M2 "
        "| M2 steady | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for warm, split, lr, wd, steps, loss, s in keys:
        group = [
            r
            for r in rows
            if (*regime(r), r["loss"], int(r["staleness"])) == (warm, split, lr, wd, steps, loss, s)
        ]

        def f(key: str, group=group) -> list[float]:
            return [float(r[key]) for r in group]

        lines.append(
            f"| {warm} | {split} | {lr:g} | {wd:g} | {steps} | {loss} | {s} | {len(group)} | "
            f"{stat(f('final_accuracy'), 100, 1)} | "
            f"{stat(f('best_accuracy'), 100, 1)} | {stat(f('masked_fraction'), 100, 3)} | "
            f"{stat(f('clip_fraction'), 100, 3)} | {stat(f('masked_fraction_steady'), 100, 3)} | "
            f"{stat(f('clip_fraction_steady'), 100, 3)} | {stat(f('m2_before'), 1, 4)} | "
            f"{stat(f('m2_before_steady'), 1, 4)} | {stat(f('seconds'), 1, 0)} |"
        )
    lines += ["", *where_m2_sits(rows, keys)]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


PPO_CLIP_LOG_RATIO = math.log(1.2)  # |log r| beyond which PPO's eps = 0.2 clip starts (log 0.8 is -0.22)


def where_m2_sits(rows: list[dict], keys: list[tuple]) -> list[str]:
    """The confident-token analysis table: how much of the trust region is confident tokens (sampled with
    p > 0.99, whose log-ratio barely moves), M2 over the rest, and the rms |log r| of the rest against
    the log-ratio at which PPO's per-token clip starts."""
    lines = [
        "Where M2 sits (means over each run's updates, then over seeds): T is the trust region (the response "
        "tokens with A > 0 and r > 1 or A < 0 and r < 1, where a trust region binds); M2 over T dilutes the few "
        "moving tokens with the confident ones. rms |log r| = "
        f"sqrt(M2 over T with p <= 0.99); PPO's clip (eps 0.2) starts at |log r| = {PPO_CLIP_LOG_RATIO:.3f}.",
        "",
        "| warm start | split | lr | loss | s | T with p > 0.99 (%) | M2 over T | M2 over T with p <= 0.99 "
        "| rms abs log r there | masked (%) | clipped (%) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in keys:
        warm, split, lr, wd, steps, loss, s = key
        if s == 0:
            continue  # fresh data: every ratio is 1
        group = [r for r in rows if (*regime(r), r["loss"], int(r["staleness"])) == key]

        def mean(key: str, group=group) -> float:
            values = [float(r[key]) for r in group if not math.isnan(float(r[key]))]
            return statistics.fmean(values) if values else math.nan

        unconfident = mean("m2_before_unconfident")
        lines.append(
            f"| {warm} | {split} | {lr:g} | {loss} | {s} | {100 * mean('confident_fraction'):.1f} | {mean('m2_before'):.4f} | "
            f"{unconfident:.4f} | {math.sqrt(unconfident) if unconfident >= 0 else math.nan:.3f} | "
            f"{100 * mean('masked_fraction'):.3f} | {100 * mean('clip_fraction'):.3f} |"
        )
    return lines


def mean_curve(rows: list[dict], key: str = "curve") -> tuple[list[float], list[float]]:
    """A curve averaged over the runs (seeds) at their common steps."""
    curves = [parse_curve(r[key]) for r in rows]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [statistics.fmean(c[x] for c in curves) for x in steps]


# (row key, y label, y scale, factor) of each row of panels in accuracy_by_staleness.png
PANEL_ROWS = (
    ("curve", "held-out accuracy (greedy)", "linear", 1.0),
    ("zeroed_curve", "masked or clipped tokens (%)", "linear", 100.0),
    ("m2_curve", "M2 of the log-ratio", "log", 1.0),
)
# the rows a run recorded since its curves kept them: what a collapse shows first
TRAINING_ROWS = (
    ("reward_curve", "mean reward of the batch", "linear", 1.0),
    ("entropy_curve", "entropy (nats per token)", "linear", 1.0),
    ("grad_norm_curve", "gradient norm", "log", 1.0),
)


def plot(rows: list[dict], out: Path, prefix: str) -> list[Path]:
    """PREFIX_accuracy.png: a panel per loss, a line per s. PREFIX_by_staleness.png: a column per s > 0, a
    line per loss (on-policy, s = 0, dashed in every accuracy panel), rows: accuracy, token fraction
    masked (M2PO) or clipped (PPO), M2 (and reward, entropy, gradient norm where the records have them);
    all means over seeds. PREFIX_by_seed.png (records with those training curves): the same rows, a
    column per seed, each run's own curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def select(loss: str, s: int) -> list[dict]:
        return [r for r in rows if r["loss"] == loss and int(r["staleness"]) == s]

    def draw(figure_path: Path, panels: list, lines_of, title_of, panel_rows) -> Path:
        fig, axes = plt.subplots(
            len(panel_rows),
            len(panels),
            figsize=(4.5 * len(panels), 3.2 * len(panel_rows)),
            squeeze=False,
            sharey="row",
            sharex=True,
        )
        for row_axes, (key, label, scale, factor) in zip(axes, panel_rows):
            for ax, panel in zip(row_axes, panels):
                for name, group, style in lines_of(panel, key):
                    steps, values = mean_curve(group, key)
                    ax.plot(
                        steps, [factor * v for v in values], marker=".", markersize=3, label=name, **style
                    )
                if key == "m2_curve":  # the budget: M2PO masks only where M2 over T would exceed it
                    ax.axhline(TAU, color="grey", linestyle=":", linewidth=1, label="tau (M2 budget)")
                    if panel == panels[0]:
                        ax.legend(fontsize=8)
                ax.set_yscale(scale)
                ax.grid(alpha=0.3)
            row_axes[0].set_ylabel(label)
        for ax, panel in zip(axes[0], panels):
            ax.set_title(title_of(panel))
            ax.legend(fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("optimizer updates")
        fig.tight_layout()
        fig.savefig(figure_path, dpi=100)
        plt.close(fig)
        return figure_path

    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in rows)]
    staleness = sorted({int(r["staleness"]) for r in rows})
    on_policy = select("on_policy", 0)

    def by_s(loss: str, key: str):
        return [(f"s={s}", select(loss, s), {}) for s in staleness if select(loss, s)]

    def by_loss(s: int, key: str):
        reference = [("on_policy (s=0)", on_policy, {"color": "k", "linestyle": "--"})]
        lines = [(loss, select(loss, s), {"color": f"C{LOSSES.index(loss)}"}) for loss in losses]
        return (reference if on_policy and key == "curve" else []) + [line for line in lines if line[1]]

    def by_seed(seed: int, key: str):
        """Each run of this seed alone: a mean over seeds would hide a collapse that only one seed shows."""
        of_seed = [r for r in rows if int(r["seed"]) == seed]
        lines = []
        for r in sorted(of_seed, key=lambda r: (int(r["staleness"]) > 0, LOSSES.index(r["loss"]))):
            if int(r["staleness"]) == 0 and key != "curve":
                continue  # fresh data: nothing masked or clipped, M2 zero
            style = (
                {"color": f"C{LOSSES.index(r['loss'])}"}
                if int(r["staleness"])
                else {"color": "k", "linestyle": "--"}
            )
            lines.append((f"{r['loss']} (s={r['staleness']})", [r], style))
        return lines

    paths = [draw(out / f"{prefix}_accuracy.png", losses, by_s, str, PANEL_ROWS[:1])]
    stale = [s for s in staleness if s > 0]
    panel_rows = PANEL_ROWS + (TRAINING_ROWS if all(r["reward_curve"] for r in rows) else ())
    if stale:
        paths.append(
            draw(out / f"{prefix}_by_staleness.png", stale, by_loss, lambda s: f"s = {s}", panel_rows)
        )
    seeds = sorted({int(r["seed"]) for r in rows})
    if stale and panel_rows != PANEL_ROWS:  # the grid's records (with training curves): a column per seed
        paths.append(draw(out / f"{prefix}_by_seed.png", seeds, by_seed, lambda s: f"seed {s}", panel_rows))
    return paths


FIELDS = [
    "run",
    "loss",
    "staleness",
    "seed",
    "lr",
    "weight_decay",
    "steps",
    "warm_start",
    "split",
    "final_accuracy",
    "best_accuracy",
    "masked_fraction",
    "clip_fraction",
    "masked_fraction_steady",
    "clip_fraction_steady",
    "m2_before",
    "m2_before_steady",
    "confident_fraction",
    "m2_before_unconfident",
    "staleness_mean",
    "seconds",
    "start_accuracy",
    "heldout",
    "commit",
    "curve",
    "zeroed_curve",
    "m2_curve",
    "reward_curve",
    "entropy_curve",
    "grad_norm_curve",
]


def report(results: Path) -> list[dict]:
    """RESULTS/sweep.csv, sweep.md and the plots of every regime, from the records in RESULTS/runs."""
    rows = sorted(load_records(results / "runs"), key=table_order)
    results.mkdir(parents=True, exist_ok=True)
    with (results / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        print(write_table(rows, results / "sweep.md"))
        for key in sorted({regime(r) for r in rows}):
            plot([r for r in rows if regime(r) == key], results, f"sweep_{regime_tag(key)}")
    cells = grid_cells(rows, results / "runs")
    if cells:
        print(write_grid(cells, results / "grid.md"))
    return rows


def grid_cells(rows: list[dict], records: Path) -> dict[tuple, list[dict]]:
    """The runs of every regime whose records hold per-problem correctness, as grid.py reads them."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        correct = read_correct(records / r["run"] / "correct.csv")
        if not correct:
            continue
        cells.setdefault(regime(r), []).append(
            {
                "loss": r["loss"],
                "s": int(r["staleness"]),
                "seed": int(r["seed"]),
                "steps": int(r["steps"]),
                "curves": read_curves(records / r["run"] / "curves.csv"),
                "correct": correct,
            }
        )
    return cells


def add_run_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options every way of running these runs shares (the sweep and the calibration)."""
    parser.add_argument(
        "--out", default="runs/staleness_sweep", help="work dir: the warm start and the runs' events"
    )
    parser.add_argument(
        "--results",
        default=str(RESULTS),
        help="where the run records (RESULTS/runs/<run>/), tables and plots go (default: docs/results)",
    )
    parser.add_argument("--config", default=str(RECIPE), help="base recipe (default: the CPU demo's)")
    parser.add_argument(
        "--steps", type=int, default=steps, help="optimizer updates per run (>> the largest s)"
    )
    parser.add_argument("--eval-every", type=int, default=128)
    parser.add_argument(
        "--eval-prompts", type=int, default=300, help="held-out problems per evaluation during training"
    )
    parser.add_argument(
        "--heldout",
        type=int,
        default=1000,
        help="held-out problems (never trained on); the final accuracy is measured on all of them",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (each uses one core: at most the core count)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: tables and plots from the records under --results",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: a 20-step warm start")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="fact",
        help="the task's split: 'fact' keeps every twin of a held-out problem out of training; 'problem' is "
        "the split by question string the sweeps before it ran on (reproduce them with --warm-start short)",
    )
    parser.add_argument(
        "--warm-start",
        choices=sorted(WARM_STARTS),
        default="short",
        help="the supervised warm start every run starts from (WARM_STARTS)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")


def check_start(records: Path, split: str, warm_start: str, correct: str) -> None:
    """Refuse a warm start that differs from the one the records of its (split, warm start) started from:
    a sweep continued on another machine rebuilds it, and runs from two starting points do not compare."""
    for settings_file in sorted([*records.glob("*/summary.json"), *records.glob("*/progress.json")]):
        settings = LEGACY | json.loads(settings_file.read_text())["settings"]
        if (settings["split"], settings["warm_start"]) != (split, warm_start):
            continue
        start = read_correct(settings_file.parent / "correct.csv").get("start")
        if start is not None and start != correct:
            raise ValueError(
                f"{settings_file.parent / 'correct.csv'}: this run started from another {warm_start} warm start "
                f"({100 * accuracy_of(start):.1f}% held-out, this machine built {100 * accuracy_of(correct):.1f}%, "
                f"{sum(a != b for a, b in zip(start, correct))} problems differ): rebuild it as that run's "
                "machine did, or use another --results"
            )


def run_all(settings: list[tuple], records: Path, args) -> list[Exception]:
    """Run (or reuse) every setting, `--jobs` at a time; the warm start is built only if a run needs it."""
    out = Path(args.out).resolve()
    task_cache: list = []
    lock = threading.Lock()

    def task():
        with lock:  # the first run that needs it builds it; the others wait
            if not task_cache:
                task_cache.append(
                    prepare(out, 0, args.heldout, args.quick, split=args.split, warm_start=args.warm_start)
                )
                check_start(records, args.split, args.warm_start, task_cache[0][2])
                logger.info(
                    "warm start: held-out accuracy %.3f on %d problems",
                    accuracy_of(task_cache[0][2]),
                    args.heldout,
                )
        return task_cache[0]

    failures = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, out, records, task, setting, args) for setting in settings]
        for future in futures:
            try:
                future.result()
            except Exception as err:  # the other runs still finish and are reported
                failures.append(err)
                logger.error("%s", err)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, steps=1024)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument(
        "--staleness", nargs="+", type=int, default=list(STALENESS), help="s in optimizer updates"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lr", nargs="+", type=float, help="learning rates (default: the recipe's)")
    parser.add_argument("--weight-decay", type=float, help="weight decay (default: the recipe's)")
    parser.add_argument(
        "--run-length",
        action="store_true",
        help="train nothing: print the run length the rule gives from the longest on_policy record at --lr",
    )
    parser.add_argument("--window", type=int, default=256, help="updates either side, for --run-length")
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="train nothing: record the curves so far of every unfinished run under --out (commit them)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = Path(args.results).resolve()
    start = time.perf_counter()
    train = recipe_train(Path(args.config))
    lrs = args.lr or [float(train["lr"])]
    if args.weight_decay is None:
        args.weight_decay = float(train.get("weight_decay", 0.0))
    if args.snapshot:
        names = snapshot(Path(args.out).resolve(), results / "runs")
        print(f"recorded {len(names)} unfinished runs: {' '.join(names)}")
        return 0
    if args.run_length:
        return print_run_length(results / "runs", lrs[0], args.weight_decay, args.window)
    settings = [] if args.report else grid(args.losses, args.staleness, args.seeds, lrs)
    if not settings and not args.report:
        parser.error("the grid is empty: on_policy runs only at s = 0, the other losses only at s > 0")
    failures = run_all(settings, results / "runs", args)
    rows = report(results)
    print(
        f"wrote {len(rows)} runs to {results / 'sweep.csv'}, sweep.md and the plots "
        f"in {time.perf_counter() - start:.0f}s"
    )
    if failures:
        print(f"{len(failures)} of {len(settings)} runs failed; rerun the same command to retry them")
        return 1
    return 0


def print_run_length(records: Path, lr: float, weight_decay: float, window: int) -> int:
    """The sweep's run length from the longest on_policy record at (lr, weight decay), finished or not
    (the rule needs only the curve up to the first plateau): the plateau update (plateau_length), rounded
    up to a multiple of 64, and at least 512 so the steady phase at s = 256 is at least as long as the
    warm-start phase."""
    runs = []
    for settings_file in [*records.glob("*/summary.json"), *records.glob("*/progress.json")]:
        settings = json.loads(settings_file.read_text())["settings"]
        if (
            settings["loss"] == "on_policy"
            and math.isclose(float(settings["lr"]), lr)
            and math.isclose(float(settings["weight_decay"]), weight_decay)
        ):
            runs.append((int(settings["steps"]), settings_file.parent))
    if not runs:
        print(f"no on_policy record at lr {lr:g}, weight decay {weight_decay:g} under {records}")
        return 1
    record = max(runs)[1]
    accuracy = series(read_curves(record / "curves.csv"), "accuracy")
    u = plateau_length([step for step, _ in accuracy], [a for _, a in accuracy], window)
    so_far = (
        "" if (record / "summary.json").is_file() else f" (unfinished, evaluated to update {accuracy[-1][0]})"
    )
    if u is None:
        print(
            f"{record.name}{so_far}: accuracy still gains >= 1 point per {window} updates; run on_policy longer"
        )
        return 1
    print(f"{record.name}{so_far}: plateau at update {u}; run length {max(512, -(-u // 64) * 64)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
