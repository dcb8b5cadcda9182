"""Where a run stands and what makes a resume exact: the progress counters, the checkpoint with the queue's commit
point in it (docs/queue.md), and the log of what each update consumed."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from megatron_m2po.config import ConfigError
from megatron_m2po.io_errors import naming_write_errors
from megatron_m2po.trainer import checkpointing
from megatron_m2po.trainer.distribute import SharedProducer, broadcast_from_rank0
from megatron_m2po.trainer.policy import Policy
from megatron_m2po.types import Group

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a checkpoint must restore besides weights: where the run is."""

    step: int = 0  # training steps done
    version: int = 0  # optimizer updates done = policy version
    skipped_checkpoints: int = 0  # newer checkpoints `--resume` could not load (named in its warnings)


# What `save` puts in a checkpoint's trainer state and `restore` reads back, by type.
SAVED_STATE = {"step": int, "version": int, "scheduler": dict, "data": dict, "queue": dict}


def check_saved_state(state: dict) -> None:
    """Raise ValueError naming the first key of `SAVED_STATE` that `state` lacks or holds with another type."""
    for key, kind in SAVED_STATE.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            shown = "missing" if key not in state else f"{type(value).__name__} {value!r:.60}"
            raise ValueError(f"'{key}': {shown}, expected {'a count' if kind is int else 'an object'}")


def restore_collective(trainer: Policy, ckpt_root: Path, resume: bool | str) -> tuple[Progress, dict | None]:
    """With `resume`, load the newest checkpoint that loads (or the one `resume` names) into the trainer;
    return the progress and the saved state."""
    found = None
    if resume:
        path = resume if isinstance(resume, str) else None
        found = checkpointing.load_newest_checkpoint_collective(
            ckpt_root, trainer.model, trainer.optimizer, path=path, check_state=check_saved_state
        )
    if found is None:
        if resume:
            logger.info("--resume: no checkpoint in %s, starting fresh", ckpt_root)
        elif checkpointing.list_checkpoints(ckpt_root):
            raise ConfigError(
                f"'logging.run_dir': {ckpt_root.parent} already holds checkpoints of another run; pass --resume "
                "to continue it, or choose a new run_dir"
            )
        return Progress(), None
    ckpt, saved, skipped = found
    trainer.scheduler.load_state_dict(saved["scheduler"])
    progress = Progress(step=saved["step"], version=saved["version"], skipped_checkpoints=len(skipped))
    logger.info("resumed from %s at step %d (version %d)", ckpt, progress.step, progress.version)
    return progress, saved


def save_collective(ckpt_root: Path, progress: Progress, trainer: Policy, producer: SharedProducer) -> None:
    """Checkpoint the run. The queue's commit point goes inside it; once it is on disk, the journal
    segments that the oldest kept checkpoint consumed are freed (`--resume` may fall back to any kept one)."""
    state = {"step": progress.step, "version": progress.version, **trainer.state_dict_extra()}
    state = broadcast_from_rank0({**state, **producer.state_dict()})
    checkpointing.save_checkpoint_collective(
        ckpt_root,
        progress.step,
        trainer.model,
        trainer.optimizer,
        state,
        keep_last=trainer.cfg.checkpoint.keep_last,
    )
    producer.checkpoint_saved(ckpt_root)


class ConsumedLog:
    """`run_dir/consumed.jsonl`: which groups (prompt id, producing version) each update trained on.

    An audit trail for staleness and for exactly-once consumption across restarts: on resume, the lines
    of steps after the checkpoint (work that is redone) are dropped first, and a last line cut by a kill
    is dropped with a warning (its update is redone too); a damaged line before it is an error.
    """

    def __init__(self, path: Path, *, keep_through_step: int, enabled: bool = True):
        """`enabled`: False off rank 0 (which alone writes it)."""
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            lines = path.read_text().splitlines()
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    step = json.loads(line)["step"] if line.strip() else None
                except (ValueError, KeyError, TypeError) as e:
                    if number < len(lines):
                        raise ValueError(
                            f"{path}: line {number} is not a consumed-log record ({e})"
                        ) from None
                    logger.warning("%s: dropping its torn last line %d (%s)", path, number, e)
                    continue
                if step is not None and step <= keep_through_step:
                    kept.append(line)
            path.write_text("".join(ln + "\n" for ln in kept))

    def append(self, step: int, version: int, groups: list[Group]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "version": version, "groups": [[g.prompt_id, g.min_version] for g in groups]}
        with naming_write_errors("consumed log append", self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
