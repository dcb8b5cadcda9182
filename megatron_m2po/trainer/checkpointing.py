"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint `run_dir/checkpoints/step_00000012/` holds
- `dist/`: a Megatron distributed checkpoint (`megatron.core.dist_checkpointing`) of the model and the
  optimizer state (sharded per TP/PP rank; reshardable on load);
- `trainer_state.json`: step, policy version, LR-scheduler state, data position (prompt order and
  cursor), and the replay queue's commit point (which journaled groups were consumed);
- `rng_rank<R>.pt`: every RNG of every rank (torch, python, numpy, Megatron's TP tracker).
It is written into `step_N.partial` and renamed only after every rank finished, and `latest` is
updated last, so a crash while saving leaves the previous checkpoint as the one to resume from.
The queue journal lives outside checkpoints; its commit point inside them, so a restart replays
exactly the groups that checkpoint had not consumed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_m2po.models import unwrap_model
from megatron_m2po.trainer.distribute import rank

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the directory and the problem."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # noqa: BLE001 - no tracker initialised (CPU single process): nothing to restore
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        try:
            tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
        except Exception as e:  # noqa: BLE001
            logger.warning("could not restore the Megatron RNG tracker state: %s", e)


def _sharded_state(model, optimizer, *, is_loading: bool) -> dict[str, Any]:
    model_sd = unwrap_model(model).sharded_state_dict()  # names without DDP's `module.` prefix
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}


def save_checkpoint(
    ckpt_root: str | Path, step: int, model, optimizer, trainer_state: dict[str, Any], *, keep_last: int
) -> Path:
    """Collective: every rank calls it. `trainer_state` must be JSON-able (rank 0's copy is written)."""
    ckpt_root = Path(ckpt_root)
    final = step_dir(ckpt_root, step)
    partial = final.with_name(final.name + ".partial")
    if rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "dist").mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(partial / "dist"))
    torch.save(_rng_state(), partial / f"rng_rank{rank()}.pt")
    if rank() == 0:
        (partial / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    _barrier()
    if rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        tmp = ckpt_root / (LATEST + ".tmp")
        tmp.write_text(final.name + "\n")
        tmp.replace(ckpt_root / LATEST)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.partial` one is never listed)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        path = ckpt_root / pointer.read_text().strip()
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{pointer} names {path}, which has no {STATE_FILE}")
        return path
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing; {path} is not a complete training checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: corrupt JSON ({e})") from None


def load_checkpoint(path: str | Path, model, optimizer) -> dict[str, Any]:
    """Collective: restore model, optimizer and this rank's RNG; return the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    try:
        loaded = dist_checkpointing.load(
            _sharded_state(model, optimizer, is_loading=True), str(path / "dist")
        )
    except Exception as e:
        raise CheckpointError(f"{path / 'dist'}: cannot load the model/optimizer checkpoint: {e}") from e
    unwrap_model(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / f"rng_rank{rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("%s missing (different world size?): RNG streams start fresh", rng_file)
    return state
