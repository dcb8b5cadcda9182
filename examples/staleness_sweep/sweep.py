"""Staleness sweep on the CPU toy task (issue 7): losses x staleness s x seeds, fixed-lag protocol.

    python examples/staleness_sweep/sweep.py --out runs/sweep --jobs 2             # the full grid
    python examples/staleness_sweep/sweep.py --out runs/sweep --losses on_policy m2po --staleness 0 4 \\
        --seeds 0 --steps 50                                                      # a small one

Every run starts from the same warm-started tiny model of the CPU demo (built once under OUT/task) and
trains with the demo recipe (examples/cpu_demo/config.yaml: 16 prompts x 8 samples per update, one
update per step) in `fixed` mode with K = s batches in the FIFO, so every batch is exactly s optimizer
updates old (the paper's protocol; s = 0 is `sync`). At s = 0 every importance ratio is 1 and every
loss computes the on-policy gradient, so s = 0 is run once, as `on_policy`, and the other losses run
at every s > 0. Each run is a separate `python -m megatron_m2po.train` process (`--jobs` at a time);
its TensorBoard events give the held-out accuracy curve (`eval/accuracy`, greedy), the masked /
clipped token fraction and M2.

A finished run leaves OUT/runs/<run>/summary.json; rerunning the same command skips it, so a killed
sweep resumes where it stopped (an unfinished run starts over).

Writes OUT/results.csv (one row per run), OUT/results.md (mean +- std over seeds), OUT/accuracy.png
(held-out accuracy vs updates, one panel per loss, one line per s) and OUT/accuracy_by_staleness.png
(one panel per s, one line per loss, on-policy in every panel: the paper's comparison).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "cpu_demo" / "config.yaml"
LOSSES = ("on_policy", "grpo", "grpo_noclip", "m2po", "m2po_clip")
STALENESS = (0, 4, 16, 64, 256)

logger = logging.getLogger("staleness_sweep")


def run_name(loss: str, s: int, seed: int) -> str:
    return f"{loss}_s{s}_seed{seed}"


def grid(losses, staleness, seeds) -> list[tuple[str, int, int]]:
    """(loss, s, seed) in run order: seed by seed, so a sweep stopped early has whole comparisons."""
    return [
        (loss, s, seed)
        for seed in seeds
        for loss in losses
        for s in staleness
        if (loss == "on_policy") == (s == 0)
    ]


def table_order(row: dict) -> tuple:
    return LOSSES.index(row["loss"]), int(row["staleness"]), int(row["seed"])


def finished_rows(out: Path) -> list[dict]:
    """The results rows of every finished run under OUT/runs, the curves read again from its events."""
    return [
        {**json.loads(done.read_text())["row"], **summarize_run(done.parent)}
        for done in (out / "runs").glob("*/summary.json")
    ]


def prepare(out: Path, seed: int, heldout: int, quick: bool) -> tuple[Path, dict[str, Path], float]:
    """The demo's task files and warm-started model, built once and reused by every run, and the warm
    start's greedy accuracy on all held-out problems (the point every run starts from)."""
    from megatron_m2po.demo import heldout_accuracy, prepare_task, warm_start_model

    warm = out / "task" / "warmstart"
    data, base = prepare_task(out / "task", seed=seed, heldout=heldout)
    if not (warm / "config.json").is_file():
        limits = {"max_steps": 20, "check_every": 10, "target": 2.0} if quick else {}
        warm_start_model(base, warm, data, seed=seed, **limits)
    start_file = out / "task" / "warmstart_accuracy.json"
    if not start_file.is_file():
        start_file.write_text(json.dumps({"accuracy": heldout_accuracy(warm, data["heldout"], 0, threads=1)}))
    return warm, data, json.loads(start_file.read_text())["accuracy"]


def run_overrides(warm: Path, data: dict[str, Path], run_dir: Path, loss: str, s: int, seed: int, args):
    """The `section.key=value` list that turns the base recipe into one (loss, s, seed) run."""
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
        f"algorithm.loss={loss}",
        *mode,
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"eval.every={args.eval_every}",
        f"eval.max_prompts={args.eval_prompts}",
        f"staleness.queue_capacity={16 * (s + 2)}",
        "checkpoint.save_at_end=false",
        "logging.console=none",
        "logging.level=WARNING",
        *args.overrides,
    ]


def run_one(out: Path, warm: Path, data: dict[str, Path], loss: str, s: int, seed: int, args) -> dict:
    """Train one setting (or reuse its finished run) and return its results row; the final accuracy is
    the exported policy's on every held-out problem (the curve uses the first --eval-prompts)."""
    from megatron_m2po.demo import heldout_accuracy

    run_dir = out / "runs" / run_name(loss, s, seed)
    overrides = run_overrides(warm, data, run_dir, loss, s, seed, args)
    done = run_dir / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary["overrides"] != overrides or summary["config"] != str(args.config):
            raise ValueError(
                f"{done}: this run was made with other settings ({summary['overrides']}); "
                "use a new --out for a different sweep"
            )
        logger.info("%s already done, reused", run_dir.name)
        return summary["row"]
    if run_dir.exists():  # killed part-way: its events would mix with the new run's
        shutil.rmtree(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_m2po.train", "--config", str(args.config), *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run {run_dir.name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    final = heldout_accuracy(run_dir / "hf", data["heldout"], 0, threads=1)
    seconds = time.perf_counter() - start
    row = {
        "loss": loss,
        "staleness": s,
        "seed": seed,
        "seconds": round(seconds),
        "final_accuracy": final,
        **summarize_run(run_dir),
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": str(args.config), "overrides": overrides, "row": row}, indent=1))
    tmp.replace(done)
    logger.info("%s done in %.0fs: final accuracy %.3f", run_dir.name, seconds, row["final_accuracy"])
    return row


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


def summarize_run(run_dir: Path) -> dict:
    """From the run's TensorBoard events: the held-out accuracy curve and its best point; training
    means and 32-update curves of the zeroed token fraction (masked by M2PO, clipped by PPO) and M2."""
    from megatron_m2po.metrics import read_scalars

    series = read_scalars(run_dir)
    if "eval/accuracy" not in series:
        raise ValueError(f"{run_dir}: no eval/accuracy in its TensorBoard events")

    def mean(tag: str) -> float:
        values = [v for _, v in series.get(tag, [])]
        return statistics.fmean(values) if values else float("nan")

    masked = dict(series.get("loss/masked_fraction", []))
    clipped = dict(series.get("loss/clip_fraction", []))
    zeroed = [(step, masked.get(step, 0.0) + clipped.get(step, 0.0)) for step in sorted({*masked, *clipped})]
    curve = series["eval/accuracy"]
    return {
        "best_accuracy": max(v for _, v in curve),
        "masked_fraction": mean("loss/masked_fraction"),
        "clip_fraction": mean("loss/clip_fraction"),
        "m2_before": mean("loss/m2_before"),
        "staleness_mean": mean("train/staleness_mean"),
        "curve": format_curve(curve),
        "zeroed_curve": format_curve(binned(zeroed)),
        "m2_curve": format_curve(binned(series.get("loss/m2_before", []))),
    }


def write_table(rows: list[dict], path: Path, start_accuracy: float, heldout: int) -> str:
    """Mean +- std over seeds per (loss, s), under a line giving the common starting point."""
    keys = sorted({(r["loss"], int(r["staleness"])) for r in rows}, key=lambda k: (LOSSES.index(k[0]), k[1]))

    def stat(values: list[float], scale: float, digits: int) -> str:
        m = statistics.fmean(values) * scale
        sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{m:.{digits}f} +- {sd:.{digits}f}"

    lines = [
        f"Every run starts from the warm start: {100 * start_accuracy:.1f}% greedy accuracy on the "
        f"{heldout} held-out problems. Final accuracy: the trained policy on all of them; best: the highest "
        "point of the accuracy curve during training.",
        "",
        "| loss | s | seeds | final held-out accuracy (%) | best (%) | masked tokens (%) | clipped tokens (%) | M2 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for loss, s in keys:
        group = [r for r in rows if r["loss"] == loss and int(r["staleness"]) == s]

        def f(key: str, group=group) -> list[float]:
            return [float(r[key]) for r in group]

        lines.append(
            f"| {loss} | {s} | {len(group)} | {stat(f('final_accuracy'), 100, 1)} | "
            f"{stat(f('best_accuracy'), 100, 1)} | {stat(f('masked_fraction'), 100, 3)} | "
            f"{stat(f('clip_fraction'), 100, 3)} | {stat(f('m2_before'), 1, 4)} |"
        )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


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


def plot(rows: list[dict], out: Path) -> list[Path]:
    """accuracy.png: a panel per loss, a line per s. accuracy_by_staleness.png: a column per s > 0, a
    line per loss (on-policy, s = 0, dashed in every accuracy panel), rows: accuracy, token fraction
    masked (M2PO) or clipped (PPO), M2; all means over seeds."""
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

    paths = [draw(out / "accuracy.png", losses, by_s, str, PANEL_ROWS[:1])]
    stale = [s for s in staleness if s > 0]
    if stale:
        paths.append(
            draw(out / "accuracy_by_staleness.png", stale, by_loss, lambda s: f"s = {s}", PANEL_ROWS)
        )
    return paths


FIELDS = [
    "loss",
    "staleness",
    "seed",
    "final_accuracy",
    "best_accuracy",
    "masked_fraction",
    "clip_fraction",
    "m2_before",
    "staleness_mean",
    "seconds",
    "curve",
    "zeroed_curve",
    "m2_curve",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/staleness_sweep")
    parser.add_argument("--config", default=str(RECIPE), help="base recipe (default: the CPU demo's)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument(
        "--staleness", nargs="+", type=int, default=list(STALENESS), help="s in optimizer updates"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=1024, help="optimizer updates per run (>> the largest s)"
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
        help="train nothing: write the CSV, table and plots from every finished run under --out",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: a 20-step warm start")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out).resolve()
    start = time.perf_counter()
    warm, data, start_accuracy = prepare(out, seed=0, heldout=args.heldout, quick=args.quick)
    logger.info("warm start: held-out accuracy %.3f on %d problems", start_accuracy, args.heldout)
    settings = [] if args.report else grid(args.losses, args.staleness, args.seeds)
    if not settings and not args.report:
        parser.error("the grid is empty: on_policy runs only at s = 0, the other losses only at s > 0")
    rows, failures = [], []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, out, warm, data, loss, s, seed, args) for loss, s, seed in settings]
        for future in futures:
            try:
                rows.append(future.result())
            except Exception as err:  # the other runs still finish and are reported
                failures.append(err)
                logger.error("%s", err)
    rows = sorted(finished_rows(out) if args.report else rows, key=table_order)
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        print(write_table(rows, out / "results.md", start_accuracy, args.heldout))
        plot(rows, out)
    print(
        f"wrote {len(rows)} runs to {csv_path}, results.md and the plots in {time.perf_counter() - start:.0f}s"
    )
    if failures:
        print(f"{len(failures)} of {len(settings)} runs failed; rerun the same command to retry them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
