"""Training metrics: scalars and histograms to the experiment trackers (TensorBoard, wandb, MLflow:
`trackers/`) and one console progress line per step.

One name per quantity across trackers, console and docs, grouped by area (`NAMESPACES`). Only rank 0
writes; other ranks get a disabled logger so the loop can call it unconditionally.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tqdm import tqdm

from megatron_m2po.config import LoggingConfig
from megatron_m2po.trackers import RunInfo, Tracker, code_commit, start_trackers

logger = logging.getLogger(__name__)

NAMESPACES = ("rollout/", "queue/", "loss/", "perf/", "train/", "eval/", "reward/", "data/", "sync/", "env/", "moe/")

# Dense bf16 peak of one GPU, for the MFU estimate (H100 SXM / H200 share the figure).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# What the console line shows, in order, when present: (tag, short label, format).
CONSOLE_FIELDS = (
    ("rollout/reward_mean", "reward", "{:.3f}"),
    ("eval/accuracy", "eval", "{:.3f}"),
    ("loss/value", "loss", "{:+.4f}"),
    ("loss/m2_before", "m2", "{:.4f}"),
    ("loss/masked_fraction", "masked", "{:.2%}"),
    ("train/staleness_mean", "stale", "{:.1f}"),
    ("queue/depth", "queue", "{:.0f}"),
    ("train/grad_norm", "gnorm", "{:.3f}"),
    ("perf/time_step", "s/step", "{:.2f}"),
)


def gpu_peak_flops(gpu_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU named `gpu_name` (`platform.gpu_name()`), or None (CPU / unknown card: no MFU)."""
    if not gpu_name:
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in gpu_name), None)


def mfu(num_params: int, tokens_per_s: float, num_gpus: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation with the 6 N FLOPs per trained token estimate (attention ignored)."""
    if not peak_flops or num_gpus <= 0:
        return None
    return 6.0 * num_params * tokens_per_s / (peak_flops * num_gpus)


class _ConsoleLine:
    """A progress bar with ETA and the key metrics, via rich or tqdm; a log line when not a terminal."""

    def __init__(self, kind: str, total: int, start: int) -> None:
        self.kind, self.total, self.done = kind, total, start
        self.t0, self.start = time.monotonic(), start
        self._bar = None
        if kind == "rich" and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                transient=False,
            )
            self._task = self._bar.add_task("", total=total, completed=start)
            self._bar.start()
        elif kind == "tqdm":
            self._bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def eta_seconds(self) -> float:
        rate = (time.monotonic() - self.t0) / max(1, self.done - self.start)
        return rate * (self.total - self.done)

    def update(self, step: int, scalars: Mapping[str, float]) -> None:
        self.done = step
        text = "  ".join(
            f"{label} {fmt.format(scalars[tag])}" for tag, label, fmt in CONSOLE_FIELDS if tag in scalars
        )
        if self.kind == "none":
            return
        if self._bar is None:
            eta = self.eta_seconds()
            logger.info("step %d/%d  %s  eta %dm%02ds", step, self.total, text, eta // 60, eta % 60)
        elif self.kind == "rich":
            self._bar.update(self._task, completed=step, description=text)
        else:
            self._bar.n = step
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._bar is not None:
            if self.kind == "rich":
                self._bar.stop()
            else:
                self._bar.close()


class MetricsLogger:
    """Sends scalars and histograms to the trackers of `backends` and shows a console line per step (rank 0).

    A tracker is a record, not the run: one that cannot start is a `TrackerStartError` here, before the run
    spends anything, but if one fails later (a full disk, a lost server) the error is logged once, the
    tracker is dropped, and the writes lost from then on are counted (`failures`, logged at close).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        backends: Sequence[str] = ("tensorboard",),
        settings=None,
        config: Mapping[str, Any] | None = None,
        console: str = "rich",
        enabled: bool = True,
    ) -> None:
        """`settings`: the config's `logging` section (wandb / MLflow options; defaults when None);
        `config`: the resolved config every tracker records."""
        self.enabled = enabled
        self.console = None
        self.trackers: list[Tracker] = []
        self.failures: dict[str, int] = {}
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        settings = settings or LoggingConfig()
        run = RunInfo(
            run_dir,
            settings.run_name or run_dir.resolve().name,
            dict(config or {}),
            code_commit(),
            start_step,
        )
        self.trackers = start_trackers(backends, run, settings)
        self.failures = {t.title: 0 for t in self.trackers}
        self.console = _ConsoleLine(console, total_steps, start_step)

    def _write(self, tracker: Tracker, method: str, *args) -> None:
        """`tracker.method(*args)`; after its first failure the tracker is dropped and each lost write counted."""
        if self.failures[tracker.title]:
            self.failures[tracker.title] += 1
            return
        try:
            getattr(tracker, method)(*args)
        except tracker.errors as e:
            self.failures[tracker.title] += 1
            logger.error(
                "%s: writing %s failed (%s); the run continues without %s, the lost writes are counted and "
                "reported when the run ends",
                tracker.title,
                tracker.location,
                e,
                tracker.title,
            )

    def log(self, step: int, scalars: Mapping[str, float], *, console: bool = True) -> None:
        """Write every scalar (a non-finite one is logged as a warning and still written)."""
        if not self.enabled:
            return
        values = {}
        for tag, value in scalars.items():
            if not tag.startswith(NAMESPACES):
                raise ValueError(f"metric '{tag}' is outside the namespaces {NAMESPACES}")
            if value is None:
                continue
            values[tag] = float(value)
            if not math.isfinite(values[tag]):
                logger.warning("metric %s is %s at step %d", tag, value, step)
        for tracker in self.trackers:
            self._write(tracker, "scalars", step, values)
        if console and self.console is not None:
            self.console.update(step, scalars)

    def histogram(self, step: int, tag: str, values: Iterable[float]) -> None:
        if not self.trackers:
            return
        arr = np.asarray(list(values), dtype=np.float64)
        if arr.size:
            for tracker in self.trackers:
                self._write(tracker, "histogram", step, tag, arr)

    def flush(self) -> None:
        for tracker in self.trackers:
            self._write(tracker, "flush")

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
        for tracker in self.trackers:
            self._write(tracker, "close")
        for tracker in self.trackers:
            if self.failures[tracker.title]:
                lost = self.failures[tracker.title]
                logger.error(
                    "%s: %d writes to %s were lost after it failed", tracker.title, lost, tracker.location
                )


def _tb_dir(run_dir: str | Path) -> Path:
    """The event files' folder: a run dir's `tb/`, or the path itself."""
    run_dir = Path(run_dir)
    return run_dir / "tb" if (run_dir / "tb").is_dir() else run_dir


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a run (tag -> [(step, value)]), read back with TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # ~1 s: readers only

    tb = _tb_dir(run_dir)
    if not any(tb.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event files in {tb}")
    series: dict[str, dict[int, float]] = {}
    for events in sorted(tb.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                series.setdefault(tag, {})[ev.step] = ev.value  # a later file (resumed run) wins
    return {tag: sorted(points.items()) for tag, points in series.items()}


def read_histogram_tags(run_dir: str | Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # ~1 s: readers only

    tb = _tb_dir(run_dir)
    tags: set[str] = set()
    for events in tb.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"histograms": 0})
        acc.Reload()
        tags |= set(acc.Tags()["histograms"])
    return tags
