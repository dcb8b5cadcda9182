"""Experiment trackers that the training metrics go to (`logging.backends`): TensorBoard, wandb, MLflow.

Each backend is a small class with the same calls (`scalars`, `histogram`, `flush`, `close`) and records the
run's config and the code's git commit when it starts. `start_trackers` starts the chosen ones before the
run spends anything, so one that cannot start is a `TrackerStartError` naming it; a failure while the run
goes on is `metrics.MetricsLogger`'s to handle (logged once, the lost writes counted).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# backend name (choices.TrackerName) -> its class, as "module:Class" so an unused backend's library never loads
BACKENDS = {
    "tensorboard": "megatron_m2po.trackers.tensorboard_tracker:TensorBoardTracker",
    "wandb": "megatron_m2po.trackers.wandb_tracker:WandbTracker",
    "mlflow": "megatron_m2po.trackers.mlflow_tracker:MlflowTracker",
}


class TrackerStartError(RuntimeError):
    """A backend of `logging.backends` could not start; the message names it and says why."""


@dataclass
class RunInfo:
    """What every backend records about the run."""

    run_dir: Path
    name: str  # the run's name in wandb / MLflow
    config: dict[str, Any]  # the resolved config, as `dataclasses.asdict(Config)`
    commit: str  # `code_commit()`
    start_step: int  # > 0: a resumed run, which continues the backend's run of that run_dir


class Tracker:
    """One backend. `errors` are what a failing write raises: counted by the caller, never fatal."""

    title = ""  # in messages: "TensorBoard", "wandb", "MLflow"
    errors: tuple[type[BaseException], ...] = (OSError,)
    location = ""  # where it writes, in messages

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        raise NotImplementedError

    def histogram(self, step: int, tag: str, values) -> None:
        """`values` is a float64 numpy array; backends without histograms keep the default, which skips it."""

    def flush(self) -> None:
        """Push buffered writes out; backends that write through keep the default."""

    def close(self) -> None:
        raise NotImplementedError


def start_trackers(names: Sequence[str], run: RunInfo, settings) -> list[Tracker]:
    """Start each named backend with `settings` (the config's `logging` section), in order; the first that
    fails closes the ones already started and raises `TrackerStartError`."""
    started: list[Tracker] = []
    for name in names:
        if name not in BACKENDS:
            raise TrackerStartError(
                f"logging.backends: unknown backend '{name}' (one of {', '.join(BACKENDS)})"
            )
        module, cls = BACKENDS[name].split(":")
        try:
            started.append(getattr(importlib.import_module(module), cls)(run, settings))
        except Exception as e:  # noqa: BLE001 - any reason a backend cannot start is reported the same way
            for tracker in started:
                tracker.close()
            hint = " (pip install 'megatron_m2po[tracking]')" if isinstance(e, ImportError) else ""
            raise TrackerStartError(
                f"logging.backends: {name} could not start: {type(e).__name__}: {e}{hint}"
            ) from e
    return started


def run_ids_file(run_dir: Path) -> Path:
    return run_dir / "trackers.json"


def run_id(run: RunInfo, backend: str) -> str | None:
    """The backend's run id recorded in run_dir by an earlier start; None for a fresh run (start_step 0)."""
    path = run_ids_file(run.run_dir)
    if run.start_step == 0 or not path.is_file():
        return None
    return json.loads(path.read_text()).get(backend)


def record_run_id(run: RunInfo, backend: str, value: str) -> None:
    """Remember the backend's run id, so that `--resume` continues the same run there."""
    path = run_ids_file(run.run_dir)
    ids = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**ids, backend: value}, indent=1))


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def flat_config(config: Mapping[str, Any]) -> dict[str, str]:
    """`{"train": {"lr": 1e-6}}` -> `{"train.lr": "1e-06"}`: the config as key/value parameters."""
    return {f"{section}.{key}": str(value) for section, keys in config.items() for key, value in keys.items()}


def code_commit() -> str:
    """The git commit of the running code (`-dirty` with uncommitted changes to tracked files), or the
    package version when it is not a git checkout (a pip install)."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == package.parent:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"megatron_m2po {version('megatron_m2po')} (not a git checkout)"
    except PackageNotFoundError:
        return "unknown (not a git checkout)"
