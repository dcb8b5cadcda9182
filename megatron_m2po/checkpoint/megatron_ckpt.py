"""Megatron checkpoints via `megatron.core.dist_checkpointing` (saved at any TP/PP, resharded on load).

Layout of a checkpoint dir written here:

    DIR/m2po_checkpoint.json   format marker + architecture + the TP/PP it was written for
    DIR/hf/                    the HF config.json, generation config and tokenizer (so load_hf_config(DIR) works)
    DIR/model/                 the dist checkpoint of the model weights (+ any extra common state)

The trainer reuses `model_sharded_state_dict`, `save_sharded`, `load_sharded` for its own checkpoints
(model + optimizer + extra common state in one dist checkpoint). Entry points that save must have an
`if __name__ == "__main__":` guard: the dist-checkpoint writer spawns worker processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_m2po.checkpoint.hf_io import copy_non_weight_files
from megatron_m2po.checkpoint.mapping import architecture
from megatron_m2po.models.hf_config import MEGATRON_HF_SUBDIR

logger = logging.getLogger(__name__)

MARKER_FILE = "m2po_checkpoint.json"
MODEL_SUBDIR = "model"
FORMAT = "megatron_m2po/v1"


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).exists()


def model_sharded_state_dict(model, *, weights_only: bool = True) -> dict:
    """The sharded state dict of the (unwrapped) GPTModel: the ShardedTensors dist_checkpointing saves/loads.

    `weights_only` drops the modules' `_extra_state` objects (TE fp8 metadata, empty for the local spec), so
    a checkpoint converted from HF, one saved by a local-spec model and one saved by a TE model all load
    into each other.
    """
    from megatron_m2po.models.builder import unwrap_model

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
    dist_checkpointing.save(state, str(ckpt_dir))


def load_sharded(state: dict, ckpt_dir: str | Path) -> dict:
    """Collective: load into the given sharded state dict (any TP/PP: dist_checkpointing reshards)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a megatron dist checkpoint (no metadata.json)")
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
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path / MODEL_SUBDIR}: cannot load the model weights ({err})") from err
    from megatron_m2po.models.builder import unwrap_model

    result = unwrap_model(model).load_state_dict(loaded["model"], strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint does not fit the model (missing {missing}, unexpected {result.unexpected_keys})"
        )
    return dict(loaded.get("extra", {}))
