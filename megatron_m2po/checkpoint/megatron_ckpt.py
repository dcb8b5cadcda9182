"""Megatron checkpoints via `megatron.core.dist_checkpointing` (saved at any TP/PP, resharded on load).

Layout of a checkpoint dir written here:

    DIR/m2po_checkpoint.json   format marker + architecture + the TP/PP/EP it was written for
    DIR/hf/                    the HF config.json, generation config and tokenizer (so load_hf_config(DIR) works)
    DIR/model/                 the dist checkpoint of the model weights (+ any extra common state)

The trainer reuses `model_sharded_state_dict`, `save_sharded`, `load_sharded` for its own checkpoints
(model + optimizer + extra common state in one dist checkpoint). Entry points that save must have an
`if __name__ == "__main__":` guard: the dist-checkpoint writer forks worker processes.

Trust: loading a dist checkpoint runs code from it (torch unpickles `.metadata` and the byte items of
the `.distcp` shards), so `check_trusted` refuses a checkpoint that another user could have written, and
`verify_dist_files` reads `.metadata` first with an unpickler that only builds torch's metadata classes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import stat
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

from megatron_m2po.checkpoint.hf_io import copy_non_weight_files
from megatron_m2po.models.builder import unwrap_model
from megatron_m2po.models.hf_config import MEGATRON_HF_SUBDIR
from megatron_m2po.models.mapping import architecture

logger = logging.getLogger(__name__)

MARKER_FILE = "m2po_checkpoint.json"
MODEL_SUBDIR = "model"
FORMAT = "megatron_m2po/v1"


TRUST_ENV = "M2PO_TRUST_CHECKPOINTS"


class UntrustedCheckpointError(PermissionError):
    """A checkpoint another user could have written: loading it could run their code."""


def _writable_by_others(st: os.stat_result, me: int) -> str | None:
    """Why another user could change the file or directory `st` describes; None if no one but us (or root) can."""
    if st.st_uid not in (me, 0):
        return f"owned by uid {st.st_uid}, not by this user (uid {me}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "world" if st.st_mode & stat.S_IWOTH else "group"
        return f"{who}-writable (mode {stat.filemode(st.st_mode)})"
    return None


def _containers(path: Path, root: Path) -> list[Path]:
    """`path` and each directory above it up to `root` (only `path` and its parent when `root` is not above it)."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    above = list(path.parents)
    return [path, *(above[: above.index(root) + 1] if root in above else above[:1])]


def check_trusted(path: str | Path, *, root: str | Path | None = None) -> None:
    """Refuse checkpoint dir `path` if another user could have written anything that loading it reads.

    Why: torch's dist-checkpoint reader unpickles `.metadata` and the shards' byte items, so whoever can
    write a checkpoint can run code in the process that loads it. Checked, each by the file it really is
    (its inode: a hard link is checked as the file it links to): `path` and every directory above it up to
    `root` (default: its parent), plus the directory holding the target of any of them that is a symbolic
    link; then everything under `path`, walked with symbolic links followed, each of which must resolve to
    inside `path`. Refused: a file or directory owned by a uid other than ours or root, or group/world-
    writable; a link leaving the checkpoint; anything but directories and regular files (a FIFO would hang
    the load). `M2PO_TRUST_CHECKPOINTS=1` skips this.
    """
    path = Path(path)
    if os.environ.get(TRUST_ENV) == "1":
        logger.warning("%s=1: loading %s without checking who can write it", TRUST_ENV, path)
        return
    me = os.geteuid()

    def refuse(p: Path, problem: str) -> None:
        raise UntrustedCheckpointError(
            f"{p}: {problem}. Loading checkpoint {path} would run code from it (torch unpickles its "
            f"metadata), so it is loaded only if no other user can write it. If you trust whoever can: "
            f"`chmod -R go-w` / `chown` it, or set {TRUST_ENV}=1"
        )

    def check(p: Path, st: os.stat_result) -> None:
        problem = _writable_by_others(st, me)
        if problem:
            refuse(p, problem)

    for d in _containers(path, Path(root) if root is not None else path.parent):
        check(d, d.stat())
        if d.is_symlink():  # whoever can write the directory the target is in can swap the target
            target_dir = Path(os.path.realpath(d)).parent
            check(target_dir, target_dir.stat())
    inside = Path(os.path.realpath(path))
    seen: set[tuple[int, int]] = set()
    todo = [path]
    while todo:
        p = todo.pop()
        if p is not path and p.is_symlink():
            target = Path(os.path.realpath(p))
            if not target.is_relative_to(inside):
                refuse(p, f"a symbolic link to {target}, outside the checkpoint ({inside})")
        st = p.stat()  # follows links: what is checked is what will be read
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        check(p, st)
        if stat.S_ISDIR(st.st_mode):
            todo += sorted(p.iterdir(), reverse=True)
        elif not stat.S_ISREG(st.st_mode):
            refuse(p, f"not a regular file (mode {stat.filemode(st.st_mode)})")


def make_private(path: str | Path) -> None:
    """Drop group/world write permission from `path` and everything under it (a umask of 002 would
    otherwise make our own checkpoints fail `check_trusted`)."""
    path = Path(path)
    for p in [path, *path.rglob("*")]:
        mode = p.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & (stat.S_IWGRP | stat.S_IWOTH):
            p.chmod(stat.S_IMODE(mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a dist checkpoint's `.metadata` holds: torch's checkpoint metadata classes, sizes,
    dtypes and layouts. Anything else (`os.system`, ...) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        ):
            return getattr(torch, name)
        if (module, name) in (("torch.serialization", "_get_layout"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which checkpoint metadata never holds")


def read_dist_metadata(dist_dir: str | Path):
    """The `Metadata` of a dist checkpoint, unpickled without running code from the file."""
    f = Path(dist_dir) / ".metadata"
    try:
        with open(f, "rb") as stream:
            return _MetadataUnpickler(stream).load()
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{f}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from err


def verify_dist_files(dist_dir: str | Path) -> None:
    """Check that every shard file a dist checkpoint's metadata names exists and is long enough.

    Why: a truncated shard otherwise surfaces from torch's reader as a bare `EOFError` inside a
    `CheckpointException` (a BaseException) that names no file.
    """
    dist_dir = Path(dist_dir)
    for required in (".metadata", "metadata.json"):
        if not (dist_dir / required).is_file():
            raise FileNotFoundError(f"{dist_dir / required}: missing; {dist_dir} is not a complete dist checkpoint")
    metadata = read_dist_metadata(dist_dir)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = dist_dir / name
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (named by {dist_dir / '.metadata'})")
        if f.stat().st_size < size:
            raise ValueError(f"{f}: truncated ({f.stat().st_size} bytes, its metadata needs {size})")


def use_in_process_write_results() -> None:
    """Make Megatron's synchronous dist-checkpoint save collect its writers' results in this process.

    Why: by default it starts a `multiprocessing` Manager server (a spawned ~270 MB process, plus a
    resource tracker) on the first save and keeps it for the process's life; after a kill -9 of the
    trainer both outlive it. Our saves are synchronous (the results queue never leaves this process),
    so a plain queue does the same job without a server. The forked writer workers exit after each save.
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).exists()


def model_sharded_state_dict(model, *, weights_only: bool = True) -> dict:
    """The sharded state dict of the (unwrapped) GPTModel: the ShardedTensors dist_checkpointing saves/loads.

    `weights_only` drops the modules' `_extra_state` objects (TE fp8 metadata, empty for the local spec), so
    a checkpoint converted from HF, one saved by a local-spec model and one saved by a TE model all load
    into each other.
    """
    state = unwrap_model(model).sharded_state_dict()
    if weights_only:
        state = {key: value for key, value in state.items() if not key.endswith("_extra_state")}
    return state


def save_sharded(state: dict, ckpt_dir: str | Path) -> None:
    """Collective: save a (nested) sharded state dict; plain values in it go to the common state (rank 0)."""
    ckpt_dir = Path(ckpt_dir)
    if torch.distributed.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    use_in_process_write_results()
    dist_checkpointing.save(state, str(ckpt_dir))


def load_sharded(state: dict, ckpt_dir: str | Path) -> dict:
    """Collective: load into the given sharded state dict (any TP/PP: dist_checkpointing reshards)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a megatron dist checkpoint (no metadata.json)")
    check_trusted(ckpt_dir, root=ckpt_dir.parent)
    verify_dist_files(ckpt_dir)
    return dist_checkpointing.load(state, str(ckpt_dir))


def save_model_checkpoint(
    model,
    out_dir: str | Path,
    *,
    hf_source_dir: str | Path,
    hf_config,
    extra_common: dict[str, Any] | None = None,
) -> Path:
    """Collective: write DIR/{model,hf,m2po_checkpoint.json} for the live model."""
    out = Path(out_dir)
    state = {"model": model_sharded_state_dict(model)}
    if extra_common:
        state["extra"] = dict(extra_common)
    save_sharded(state, out / MODEL_SUBDIR)
    if torch.distributed.get_rank() == 0:
        copy_non_weight_files(hf_source_dir, out / MEGATRON_HF_SUBDIR)
        marker = {
            "format": FORMAT,
            "architecture": architecture(hf_config),
            "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
            "expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
        }
        (out / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    torch.distributed.barrier()
    return out


def load_model_checkpoint(model, path: str | Path) -> dict[str, Any]:
    """Collective: load the model weights of a checkpoint dir into this rank's shard; returns the extra common state."""
    path = Path(path)
    marker_file = path / MARKER_FILE
    try:
        marker = json.loads(marker_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{marker_file}: unreadable checkpoint marker ({err})") from err
    if marker.get("format") != FORMAT:
        raise ValueError(f"{marker_file}: format {marker.get('format')!r}, expected {FORMAT!r}")
    state = {"model": model_sharded_state_dict(model)}
    try:
        loaded = load_sharded(state, path / MODEL_SUBDIR)
    except (FileNotFoundError, UntrustedCheckpointError):
        raise
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        raise ValueError(f"{path / MODEL_SUBDIR}: cannot load the model weights ({err})") from err
    result = unwrap_model(model).load_state_dict(loaded["model"], strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint does not fit the model (missing {missing}, unexpected {result.unexpected_keys})"
        )
    return dict(loaded.get("extra", {}))
