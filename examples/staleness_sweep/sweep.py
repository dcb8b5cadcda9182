"""Staleness sweep on the CPU toy task (issue 7): losses x staleness s x seeds, fixed-lag protocol.

    python examples/staleness_sweep/sweep.py --out runs/sweep                      # the full grid
    python examples/staleness_sweep/sweep.py --out runs/sweep --losses on_policy m2po --staleness 0 4 \\
        --seeds 0 --steps 50                                                      # a small one

Every run starts from the same warm-started tiny model of the CPU demo (built once under OUT/task) and
trains with the demo recipe (examples/cpu_demo/config.yaml: 16 prompts x 8 samples per update, one
update per step) in `fixed` mode with K = s batches in the FIFO, so every batch is exactly s optimizer
updates old (the paper's protocol; s = 0 is `sync`). `on_policy` runs only at s = 0, the other losses
at every s. Each run is a separate `python -m megatron_m2po.train` process; its TensorBoard events give
the held-out accuracy curve (`eval/accuracy`, greedy), the masked / clipped token fraction and M2.

Writes OUT/results.csv (one row per run), OUT/results.md (mean +- std over seeds) and
OUT/accuracy.png (held-out accuracy vs updates, one panel per loss, one line per s).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "cpu_demo" / "config.yaml"
LOSSES = ("on_policy", "grpo", "grpo_noclip", "m2po", "m2po_clip")
STALENESS = (0, 4, 16, 64, 256)

logger = logging.getLogger("staleness_sweep")


def run_name(loss: str, s: int, seed: int) -> str:
    return f"{loss}_s{s}_seed{seed}"


def grid(losses, staleness, seeds) -> list[tuple[str, int, int]]:
    return [
        (loss, s, seed)
        for loss in losses
        for s in staleness
        for seed in seeds
        if loss != "on_policy" or s == 0
    ]


def prepare(out: Path, seed: int, heldout: int, quick: bool) -> tuple[Path, dict[str, Path]]:
    """The demo's task files and warm-started model, built once and reused by every run."""
    from megatron_m2po.demo import prepare_task, warm_start_model

    warm = out / "task" / "warmstart"
    data, base = prepare_task(out / "task", seed=seed, heldout=heldout)
    if not (warm / "config.json").is_file():
        limits = {"max_steps": 20, "check_every": 10, "target": 2.0} if quick else {}
        warm_start_model(base, warm, data, seed=seed, **limits)
    return warm, data


def train_one(out: Path, warm: Path, data: dict[str, Path], loss: str, s: int, seed: int, args) -> Path:
    run_dir = out / "runs" / run_name(loss, s, seed)
    mode = (
        ["staleness.mode=sync", "staleness.fixed_lag_steps=0"]
        if s == 0
        else ["staleness.mode=fixed", f"staleness.fixed_lag_steps={s}"]
    )
    overrides = [
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
    logger.info("%s done in %.0fs", run_dir.name, time.perf_counter() - start)
    return run_dir


def summarize_run(run_dir: Path) -> dict[str, float]:
    """Final held-out accuracy, its curve, and training means of the masked / clipped fraction and M2."""
    from megatron_m2po.metrics import read_scalars

    series = read_scalars(run_dir)
    if "eval/accuracy" not in series:
        raise ValueError(f"{run_dir}: no eval/accuracy in its TensorBoard events")

    def mean(tag: str) -> float:
        values = [v for _, v in series.get(tag, [])]
        return sum(values) / len(values) if values else float("nan")

    curve = series["eval/accuracy"]
    return {
        "final_accuracy": curve[-1][1],
        "best_accuracy": max(v for _, v in curve),
        "masked_fraction": mean("loss/masked_fraction"),
        "clip_fraction": mean("loss/clip_fraction"),
        "m2_before": mean("loss/m2_before"),
        "staleness_mean": mean("train/staleness_mean"),
        "curve": " ".join(f"{step}:{acc:.4f}" for step, acc in curve),
    }


def write_table(rows: list[dict], path: Path) -> str:
    """Mean +- std over seeds per (loss, s)."""
    keys = sorted({(r["loss"], int(r["staleness"])) for r in rows}, key=lambda k: (LOSSES.index(k[0]), k[1]))

    def stat(values: list[float], scale: float, digits: int) -> str:
        m = statistics.fmean(values) * scale
        sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{m:.{digits}f} +- {sd:.{digits}f}"

    lines = [
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


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in rows)]
    fig, axes = plt.subplots(1, len(losses), figsize=(4.5 * len(losses), 3.5), squeeze=False, sharey=True)
    for ax, loss in zip(axes[0], losses):
        for s in sorted({int(r["staleness"]) for r in rows if r["loss"] == loss}):
            curves = [
                dict(tuple(map(float, p.split(":"))) for p in r["curve"].split())
                for r in rows
                if r["loss"] == loss and int(r["staleness"]) == s
            ]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(
                steps, [statistics.fmean(c[x] for c in curves) for x in steps], marker=".", label=f"s={s}"
            )
        ax.set_title(loss)
        ax.set_xlabel("optimizer updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out accuracy (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    "curve",
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
    parser.add_argument("--eval-every", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=300, help="held-out problems per evaluation")
    parser.add_argument("--quick", action="store_true", help="smoke test: a 20-step warm start")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out).resolve()
    start = time.perf_counter()
    warm, data = prepare(out, seed=0, heldout=300, quick=args.quick)
    rows = []
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for loss, s, seed in grid(args.losses, args.staleness, args.seeds):
            run_dir = train_one(out, warm, data, loss, s, seed, args)
            row = {"loss": loss, "staleness": s, "seed": seed, **summarize_run(run_dir)}
            writer.writerow(row)
            f.flush()
            rows.append(row)
    table = write_table(rows, out / "results.md")
    plot(rows, out / "accuracy.png")
    print(table)
    print(
        f"wrote {csv_path}, {out / 'results.md'}, {out / 'accuracy.png'} in {time.perf_counter() - start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
