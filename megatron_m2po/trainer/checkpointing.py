"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint `run_dir/checkpoints/step_00000012/` holds
- `dist/`: a Megatron distributed checkpoint (`megatron.core.dist_checkpointing`) of the model and the
  optimizer state (sharded per TP/PP rank; reshardable on load);
- `trainer_state.json`: step, policy version, LR-scheduler state, data position (prompt order and
  cursor), and the replay queue's commit point (which journaled groups were consumed);
- `rng_rank<R>.pt`: every RNG of every rank (torch, python, numpy, Megatron's TP tracker), as tensors and
  plain values that `torch.load(weights_only=True)` reads without running code.
It is written into `step_N.partial` and renamed only after every rank finished, and `latest` is
updated last, so a crash while saving leaves the previous checkpoint as the one to resume from; a save
that fails removes its `.partial` and raises `CheckpointError` with the path, errno and free space.
Loading refuses a checkpoint other users can write (`megatron_ckpt.check_trusted`), and
`load_newest_checkpoint_collective` falls back to an older checkpoint when the newest does not load.
The queue journal lives outside checkpoints; its commit point inside them, so a restart replays
exactly the groups that checkpoint had not consumed.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from torch.distributed.checkpoint.api import CheckpointException

from megatron_m2po import platform
from megatron_m2po.checkpoint.megatron_ckpt import (
    check_trusted,
    make_private,
    use_in_process_write_results,
    verify_dist_files,
)
from megatron_m2po.models import unwrap_model
from megatron_m2po.platform import rank
from megatron_m2po.trainer.optimizer import load_optimizer_state, prepare_for_load

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "latest"
PARTIAL = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or resumed from; the message names the path and the problem."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints, floats and strings only (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    state.update(platform.accelerator_rng_states())
    try:
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # noqa: BLE001 - no tracker initialised (CPU single process): nothing to restore
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    platform.set_accelerator_rng_states(state)
    if "tracker" in state:
        try:
            tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
        except Exception as e:  # noqa: BLE001
            logger.warning("could not restore the Megatron RNG tracker state: %s", e)


def _read_rng_state(rng_file: Path) -> dict[str, Any] | None:
    """This rank's RNG state, read without running code from the file (None if the file is absent)."""
    if not rng_file.is_file():
        logger.warning("%s missing (different world size?): RNG streams start fresh", rng_file)
        return None
    try:
        state = torch.load(rng_file, weights_only=True)
        if not isinstance(state, dict) or not {"torch", "python", "numpy"} <= state.keys():
            raise ValueError(f"not an RNG state (keys {sorted(state) if isinstance(state, dict) else None})")
        return state
    except Exception as e:  # noqa: BLE001 - a truncated zip, a pickle payload, a wrong object: all named
        detail = f"{type(e).__name__}: {e}"
        if isinstance(e, pickle.UnpicklingError):  # torch's text suggests weights_only=False: not for us
            refused = [ln for ln in str(e).splitlines() if "GLOBAL" in ln]
            detail = f"holds objects an RNG state never does, not loaded: {refused[0] if refused else e}"
        raise CheckpointError(f"{rng_file}: unreadable RNG state ({detail})") from e


def _sharded_state(model, optimizer, *, is_loading: bool) -> dict[str, Any]:
    model_sd = unwrap_model(model).sharded_state_dict()  # names without DDP's `module.` prefix
    # The distributed optimizer's state in Megatron-LM's default layout: one shard per DP rank's buffers,
    # regrouped when loaded at another DP size (not another TP/PP size); other optimizers ignore the key.
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    if is_loading:
        prepare_for_load(optimizer)
    optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return {"model": model_sd, "optimizer": optimizer_sd}


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync; an error is an OSError with its errno (torch.save's zip writer loses it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rank_failures(err: CheckpointException) -> list[BaseException]:
    """The per-rank exceptions inside torch's CheckpointException (values are (exception, traceback))."""
    return [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]


def _describe(err: BaseException) -> str:
    """`Type: message`; for a CheckpointException, each failed rank's, without torch's tracebacks."""
    if isinstance(err, CheckpointException):
        return "; ".join(f"rank {r}: {_describe(e)}" for r, e in zip(err.failures, _rank_failures(err)))
    return f"{type(err).__name__}: {err}"


def _os_error(err: BaseException) -> OSError | None:
    """The first OSError in `err`'s cause/context chain or in a CheckpointException's per-rank failures."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        if isinstance(e, CheckpointException):
            todo += _rank_failures(e)
        todo += [e.__cause__, e.__context__]
    return None


FULL_DISK_BYTES = 1 << 20  # a failed save with less free than this: the disk is (almost certainly) full


def _save_failure(where: Path, err: BaseException) -> CheckpointError:
    """A CheckpointError that says which path failed, the errno, and the free space (measured before the
    partial files are removed). torch's zip writer reports a full disk as "unexpected pos 704 vs 598" without
    an errno: with under 1 MiB free it is named ENOSPC."""
    os_err = _os_error(err)
    detail = _describe(err)
    try:
        free = shutil.disk_usage(where.parent).free
    except OSError:
        free = None
    code = os_err.errno if os_err is not None else None
    if code is None and free is not None and free < FULL_DISK_BYTES:
        code = errno.ENOSPC
    if code is not None:
        detail = f"[Errno {code} {errno.errorcode.get(code, '?')}] {os.strerror(code)}; {detail}"
    space = f"; {free} bytes free on its filesystem" if free is not None else ""
    return CheckpointError(
        f"{where}: saving the checkpoint failed ({detail}){space}; its partial files were removed"
    )


def save_checkpoint_collective(
    ckpt_root: str | Path, step: int, model, optimizer, trainer_state: dict[str, Any], *, keep_last: int
) -> Path:
    """Collective: every rank calls it. `trainer_state` must be JSON-able (rank 0's copy is written).

    A failure removes the `.partial` directory (it would hold the disk the next save or resume needs) and
    raises `CheckpointError`; the previous checkpoint stays the one `--resume` loads.
    """
    ckpt_root = Path(ckpt_root)
    final = step_dir(ckpt_root, step)
    partial = final.with_name(final.name + PARTIAL)
    local_error = None
    try:
        if rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            (partial / "dist").mkdir(parents=True)
        _barrier()
        use_in_process_write_results()
        # torch raises a failure of this collective on every rank
        dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(partial / "dist"))
        try:
            buffer = io.BytesIO()
            torch.save(_rng_state(), buffer)
            _write_bytes(partial / f"rng_rank{rank()}.pt", buffer.getvalue())
            if rank() == 0:
                state = json.dumps(trainer_state, indent=1, sort_keys=True).encode()
                _write_bytes(partial / STATE_FILE, state)
        except OSError as e:
            local_error = e
        _agree_collective(None if local_error is None else str(local_error))
        if rank() == 0:
            make_private(ckpt_root)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            tmp = ckpt_root / (LATEST + ".tmp")
            _write_bytes(tmp, (final.name + "\n").encode())
            tmp.replace(ckpt_root / LATEST)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        failure = _save_failure(partial, local_error or e)
        if rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            (ckpt_root / (LATEST + ".tmp")).unlink(missing_ok=True)
        raise failure from e
    if rank() == 0:
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def remove_partial(ckpt_root: str | Path) -> None:
    """Delete `.partial` directories a crashed save left (they never count as checkpoints, but hold disk)."""
    for p in Path(ckpt_root).glob(f"step_*{PARTIAL}"):
        logger.warning("removing %s, left by a save that did not finish", p)
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.partial` one is never listed)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL))


def _read_latest(ckpt_root: Path) -> str | None:
    """The checkpoint name `latest` holds; None (with a warning) if it holds no plausible name."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes()[:256].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("%s: unreadable (%s), ignored: the newest step_* checkpoint is used", pointer, e)
        return None
    if not name.startswith("step_") or "/" in name or name.endswith(PARTIAL):
        logger.warning(
            "%s: %r is not a checkpoint name, ignored: the newest step_* is used", pointer, name[:80]
        )
        return None
    return name


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    ckpt_root = Path(ckpt_root)
    name = _read_latest(ckpt_root)
    if name is not None:
        path = ckpt_root / name
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{ckpt_root / LATEST} names {path}, which has no {STATE_FILE}")
        return path
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} where a number belongs")


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The checkpoint's trainer state: a JSON object whose `step` is a count (NaN / Infinity anywhere, which
    Python's json accepts, are refused)."""
    f = Path(path) / STATE_FILE
    try:
        state = json.loads(f.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing; {path} is not a complete training checkpoint") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{f}: corrupt JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: corrupt (a JSON {type(state).__name__}, not an object)")
    step = state.get("step")
    if type(step) is not int or step < 0:
        raise CheckpointError(f"{f}: corrupt ('step' is {step!r:.60}, not a step count)")
    return state


def oldest_trainer_state(ckpt_root: str | Path) -> dict[str, Any] | None:
    """The trainer state of the oldest kept checkpoint (what journal GC must still serve); None if there is
    none or it is unreadable (then nothing is collected)."""
    found = list_checkpoints(ckpt_root)
    if not found:
        return None
    try:
        return read_trainer_state(found[0])
    except CheckpointError as e:
        logger.warning("journal GC skipped: %s", e)
        return None


def _agree_collective(problem: str | None) -> None:
    """Collective: raise the first rank's problem on every rank, so all ranks skip the same checkpoint
    (and none enters the collective load while another has given up)."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    for r, p in enumerate(problems):
        if p is not None:
            raise CheckpointError(p if r == rank() or p == problem else f"rank {r}: {p}")


StateCheck = Callable[[dict[str, Any]], None]


def load_checkpoint_collective(
    path: str | Path,
    model,
    optimizer,
    *,
    run_dir: str | Path | None = None,
    check_state: StateCheck | None = None,
) -> dict[str, Any]:
    """Collective: restore model, optimizer and this rank's RNG; return the trainer state.

    Everything each rank can check alone (trust, state file and `check_state` on it, RNG file, shard sizes) is
    checked first, and the ranks agree on the outcome before the collective load. The trust check covers the
    directories above `path` up to `run_dir` (default: its parent). `check_state` raises ValueError naming
    what the trainer state lacks.
    """
    path = Path(path)
    state = rng = problem = None
    try:
        check_trusted(path, root=run_dir)
        state = read_trainer_state(path)
        if check_state is not None:
            try:
                check_state(state)
            except ValueError as e:
                raise CheckpointError(f"{path / STATE_FILE}: corrupt ({e})") from None
        rng = _read_rng_state(path / f"rng_rank{rank()}.pt")
        verify_dist_files(path / "dist")
    except (CheckpointError, OSError, ValueError) as e:
        problem = str(e)
    _agree_collective(problem)
    try:
        loaded = dist_checkpointing.load(
            _sharded_state(model, optimizer, is_loading=True), str(path / "dist")
        )
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"{path / 'dist'}: cannot load the model/optimizer checkpoint ({_describe(e)})"
        ) from e
    unwrap_model(model).load_state_dict(loaded["model"])
    load_optimizer_state(optimizer, loaded["optimizer"])
    if rng is not None:
        _set_rng_state(rng)
    return state


def load_newest_checkpoint_collective(
    ckpt_root: str | Path,
    model,
    optimizer,
    *,
    path: str | Path | None = None,
    check_state: StateCheck | None = None,
) -> tuple[Path, dict[str, Any], list[str]] | None:
    """Collective: load `path` if given, else the newest checkpoint under `ckpt_root` that loads; return
    (its path, its trainer state, why each newer one was skipped).

    A checkpoint that fails (corrupt, truncated, refused as untrusted) is skipped with a warning that says
    which and why, and the next older one is tried; None if there is none; `CheckpointError` listing every
    reason if none loads.
    """
    ckpt_root = Path(ckpt_root)
    if path is not None:
        path = Path(path)
        if not path.is_absolute() and not path.exists():
            path = ckpt_root / path  # `--resume=step_00000004`
        inside = Path(os.path.abspath(path)).is_relative_to(os.path.abspath(ckpt_root))
        run_dir = ckpt_root.parent if inside else None
        return path, load_checkpoint_collective(path, model, optimizer, run_dir=run_dir, check_state=check_state), []
    candidates = list(reversed(list_checkpoints(ckpt_root)))
    named = _read_latest(ckpt_root)
    if (
        named is not None and ckpt_root / named in candidates
    ):  # `latest` first: it is the one the run finished
        candidates.remove(ckpt_root / named)
        candidates.insert(0, ckpt_root / named)
    skipped = []
    for candidate in candidates:
        try:
            state = load_checkpoint_collective(
                candidate, model, optimizer, run_dir=ckpt_root.parent, check_state=check_state
            )
        except CheckpointError as e:
            logger.warning("--resume: skipping checkpoint %s: %s", candidate, e)
            skipped.append(f"{candidate.name}: {e}")
            continue
        if skipped:
            logger.warning(
                "--resume: resuming from %s, the newest checkpoint that loads; %d newer skipped (see above)",
                candidate.name,
                len(skipped),
            )
        return candidate, state, skipped
    if skipped:
        raise CheckpointError(f"{ckpt_root}: no checkpoint loads:\n  " + "\n  ".join(skipped))
    return None
