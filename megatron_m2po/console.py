"""The console: the project's own progress, and the other libraries' messages it hides (one list, with why).

`setup(verbose)` is what `m2po demo`, `m2po train` and `m2po evaluate` call first. Without `--verbose` it installs every
filter listed below; with it, nothing is filtered and every message comes back. Spawned workers (the reward
pool) inherit the choice through the environment (`QUIET_ENV`) and call `apply_inherited()`.

`StageBar` is one progress bar per stage of a run (warm start, evaluation; the RL loop's is
`metrics.MetricsLogger`'s) with its ETA and key metrics: a live rich bar on a terminal, log lines otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

logger = logging.getLogger("megatron_m2po.progress")

QUIET_ENV = "M2PO_QUIET"
PROJECT_LOGGER = "megatron_m2po"  # its DEBUG records (one per weight sync, per warm-start check) show with --verbose

# Python warnings hidden: (category, message regex, why it does not apply).
_FALLBACK = (
    "Megatron-core on a machine without Transformer Engine / Apex (every CPU run) uses its plain-torch "
    "kernels, which are what the project runs and tests there"
)
FILTERED_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed", _FALLBACK),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm", _FALLBACK),
    (UserWarning, r"Transformer Engine is not installed", _FALLBACK),
    (
        UserWarning,
        r"full scope is deprecated\. Use empty cuda_graph_scope",
        "Megatron's own TransformerConfig default (cuda_graph_scope) trips its deprecation check; the project "
        "sets no CUDA-graph scope",
    ),
)

# Loggers raised to a level: (logger name, level, why their lower records do not apply).
FILTERED_LOGGERS: tuple[tuple[str, int, str], ...] = (
    (
        "megatron",
        logging.WARNING,
        "INFO: the whole DDP and optimizer config dumps, the list of every parameter in each gradient bucket, "
        "Megatron-FSDP detection and dist-checkpoint progress; the run's settings are in run_dir/config.yaml",
    ),
    (
        "math_verify",
        logging.ERROR,
        "'Timeout is disabled': the reward pool enforces the per-sample timeout from outside "
        "(rollout/rewards/pool.py), and the warm start's validation scores short arithmetic answers",
    ),
    ("matplotlib", logging.WARNING, "INFO 'generated new fontManager': a one-off font cache build"),
)

# Progress bars of other libraries switched off, and why.
FILTERED_PROGRESS_BARS = (
    "transformers' 'Loading weights' and 'Writing model shards' bars: one per model load or save, a dozen per "
    "demo; the stage bars show the run's progress"
)


def setup(verbose: bool = False, level: int = logging.INFO, fmt: str = "%(name)s: %(message)s") -> None:
    """Logging for a command-line run (on a terminal through rich, so log lines print above the live bars;
    elsewhere with the time); then, unless `verbose`, the filters above (with it, the project's DEBUG lines too)."""
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(show_path=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter(fmt))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s {fmt}"))
    logging.basicConfig(level=level, handlers=[handler])  # a no-op where logging is set up already
    if verbose:
        os.environ.pop(QUIET_ENV, None)
        logging.getLogger(PROJECT_LOGGER).setLevel(logging.DEBUG)  # the per-update lines (weight sync, ...)
    else:
        quiet()


def add_verbose_argument(parser) -> None:
    """`--verbose` on a command that calls `setup` (`m2po demo`, `m2po train`, `m2po evaluate`)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every library's warnings, INFO logs and progress bars (megatron_m2po/console.py lists "
        "what is hidden otherwise, and why)",
    )


def quiet() -> None:
    """Install every filter listed in this module, here and in the processes this one spawns (idempotent)."""
    os.environ[QUIET_ENV] = "1"
    for category, message, _ in FILTERED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level, _ in FILTERED_LOGGERS:
        logging.getLogger(name).setLevel(level)
    from transformers.utils import logging as hf_logging  # ~2 s; the `m2po` dispatcher imports this module

    hf_logging.disable_progress_bar()


def apply_inherited() -> None:
    """In a spawned worker: the filters, if the process that started it installed them."""
    if os.environ.get(QUIET_ENV) == "1":
        quiet()


class StageBar:
    """A progress bar for one stage: `update(done, **metrics)`; ETA from the rate so far.

    On a terminal a rich bar; otherwise (a log file, a captured test run) a log line per `log_every` units
    of work and at the end, so a log still shows progress without drawing a bar.
    """

    def __init__(self, name: str, total: int, *, log_every: int | None = None) -> None:
        self.name, self.total, self.done = name, max(1, total), 0
        self.log_every = log_every or max(1, self.total // 10)
        self._t0 = time.monotonic()
        self._logged = 0
        self._metrics: dict[str, str] = {}
        self._bar = None
        if sys.stderr.isatty():
            self._bar = Progress(
                TextColumn(f"[bold]{name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self._task = self._bar.add_task("", total=self.total)
            self._bar.start()

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def eta_seconds(self) -> float:
        return (time.monotonic() - self._t0) / max(1, self.done) * (self.total - self.done)

    def update(self, done: int, **metrics: float | str) -> None:
        self.done = min(done, self.total)
        self._metrics.update({k: f"{v:.3g}" if isinstance(v, float) else str(v) for k, v in metrics.items()})
        text = "  ".join(f"{k} {v}" for k, v in self._metrics.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=text)
        elif self.done - self._logged >= self.log_every or self.done == self.total:
            self._logged = self.done
            eta = round(self.eta_seconds())
            parts = [f"{self.name} {self.done}/{self.total}", text, f"eta {eta // 60}m{eta % 60:02d}s"]
            logger.info("  ".join(part for part in parts if part))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
