"""`m2po plot RUN_DIR`: a PNG of a run's main curves, read from its TensorBoard event files."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from megatron_m2po.metrics import read_scalars

logger = logging.getLogger(__name__)

# (panel title, tags drawn in it). A panel with none of its tags in the run is left out.
PANELS = (
    ("reward / accuracy", ("rollout/reward_mean", "eval/accuracy")),
    ("loss", ("loss/value",)),
    ("second moment M2", ("loss/m2_before", "loss/m2_after")),
    ("masked / clipped fraction", ("loss/masked_fraction", "loss/clip_fraction")),
    ("staleness (updates)", ("train/staleness_mean", "train/staleness_max")),
    ("response length", ("rollout/response_length_mean",)),
    ("entropy / k3 KL", ("loss/entropy", "loss/kl_k3")),
    ("grad norm", ("train/grad_norm",)),
    ("tokens/s", ("perf/gen_tokens_per_s", "perf/train_tokens_per_s")),
    ("time per step (s)", ("perf/time_generate", "perf/time_wait", "perf/time_train", "perf/time_sync")),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the main curves of `run_dir` into a PNG (default RUN_DIR/curves.png); return its path."""
    import matplotlib  # ~1 s, for drawing only; the backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use: pyplot fixes its backend on import

    run_dir = Path(run_dir)
    series = read_scalars(run_dir)
    panels = [(title, [t for t in tags if t in series]) for title, tags in PANELS]
    panels = [(title, tags) for title, tags in panels if tags]
    if not panels:
        raise ValueError(
            f"{run_dir}: none of the main curves ({', '.join(t for _, ts in PANELS for t in ts)}) "
            f"were logged; tags present: {', '.join(sorted(series)) or 'none'}"
        )
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, tags) in zip(axes.flat, panels):
        for tag in tags:
            steps, values = zip(*series[tag])
            ax.plot(steps, values, label=tag, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (logging.run_dir) or its tb/ folder")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = plot_run(args.run_dir, args.out)
    logger.info("wrote %s", out)
    return 0
