"""The run directory (`logging.run_dir`): checked before a run writes anything into it.

A run writes `config.yaml`, `checkpoints/`, `queue/`, `tb/`, `consumed.jsonl`, `weights/`, `hf/` (and the
evaluation record and the experiment trackers' files) there, and a fresh run clears the queue journal an
earlier attempt left. Pointed by mistake at a directory that holds other things (a project checkout,
`$HOME`, `/`), it would overwrite or scatter files among them. So a system directory is refused outright,
and a fresh run writes only into a new or empty directory (empty run subdirectories, such as a
`checkpoints/` link to a larger disk, allowed) or one this project made (it leaves `m2po_run.json` there)
that holds nothing else; `logging.reuse_run_dir=true` lets a fresh run into any other. `--resume`
continues in the directory of the run it resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_m2po.config import Config, ConfigError
from megatron_m2po.queue.journal import is_journal_file
from megatron_m2po.rollout.producer import EVAL_RECORD

MARKER = "m2po_run.json"
# Everything a run (and `m2po plot`) writes at the top of its run directory.
RUN_ENTRIES = frozenset(
    {MARKER, "config.yaml", "checkpoints", "queue", "tb", "consumed.jsonl", "weights", "hf", "curves.png"}
    | {EVAL_RECORD, "trackers.json", "mlruns", "wandb"}
)
# The directories among them, which may be made ahead of a run (`checkpoints/` a link to a larger disk).
RUN_DIRS = frozenset({"checkpoints", "queue", "tb", "weights", "hf", "mlruns", "wandb"})
# Never a run directory: the directories of the system itself, and where users keep everything else.
SYSTEM_DIRS = frozenset(
    {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt"}
    | {"/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/tmp"}
)
# Nor anything inside these (system files, kernel interfaces, devices).
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")
SHOWN = 5  # foreign entries named in the error


def _system_dir(real: Path) -> str | None:
    """Why `real` (a resolved path) can never be a run directory; None if it can."""
    home = Path.home().resolve()
    if str(real) in SYSTEM_DIRS or real == home or real in home.parents:
        return "a system directory or your home directory itself"
    for tree in SYSTEM_TREES:
        if real.is_relative_to(tree):
            return f"inside {tree}, which holds the system's own files"
    return None


def _foreign_entries(run_dir: Path) -> list[str]:
    """What `run_dir` holds that a run does not write there (in `queue/`: anything but the journal's files)."""
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES)
    queue = run_dir / "queue"
    if queue.is_dir() and not queue.is_symlink():
        foreign += sorted(f"queue/{p.name}" for p in queue.iterdir() if not is_journal_file(p.name))
    elif queue.exists() or queue.is_symlink():
        foreign.append("queue (not a directory)")
    return foreign


def check_run_dir(cfg: Config, *, resume: bool | str) -> None:
    """Raise ConfigError if the run may not write into `logging.run_dir` (every rank, before writing)."""
    run_dir = Path(cfg.logging.run_dir)
    why = _system_dir(Path(os.path.realpath(run_dir)))
    if why:
        raise ConfigError(f"'logging.run_dir': {run_dir} is {why}; choose a directory of its own for the run")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"'logging.run_dir': {run_dir} exists and is not a directory")
    ours = (run_dir / MARKER).is_file()
    if resume and (ours or (run_dir / "checkpoints").is_dir()):
        return  # continuing the run that lives there
    if ours:
        foreign = _foreign_entries(run_dir)
    else:  # only empty run subdirectories may be there before the run's first start
        foreign = sorted(
            p.name
            for p in run_dir.iterdir()
            if not (p.name in RUN_DIRS and p.is_dir() and not any(p.iterdir()))
        )
    if foreign and not cfg.logging.reuse_run_dir:
        named = ", ".join(foreign[:SHOWN]) + (
            f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        )
        made = "holds" if ours else f"was not made by a run (no {MARKER}) and holds"
        raise ConfigError(
            f"'logging.run_dir': {run_dir} {made} files a run does not write ({named}); a fresh run would "
            "write config.yaml, checkpoints/ and queue/ among them. Choose a new or empty directory, or set "
            "logging.reuse_run_dir=true to write there anyway"
        )


def mark_run_dir(run_dir: Path) -> None:
    """Create the run directory (rank 0) and mark it as a run's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    if not marker.exists():
        marker.write_text(
            json.dumps({"written_by": "megatron_m2po", "what": "a training run directory"}) + "\n"
        )
