"""`load_policy`: one call that gives this rank's model from an HF dir or a Megatron checkpoint dir."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core.models.gpt import GPTModel

from megatron_m2po.checkpoint.hf_weights import load_hf_weights
from megatron_m2po.checkpoint.megatron_ckpt import is_megatron_checkpoint, load_model_checkpoint
from megatron_m2po.models.builder import build_model
from megatron_m2po.models.hf_config import load_hf_config


def load_policy(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    parallel=None,
    aux_loss_coef: float | None = None,
    routing_replay: bool = False,
) -> GPTModel:
    """Build this rank's GPTModel and load its weights (parallel_state must be initialised).

    `path` is an HF dir (config.json + safetensors) or a Megatron checkpoint dir written by
    tools/convert_hf_to_megatron.py (resharded on load to the current TP/PP/EP). `aux_loss_coef` overrides
    an MoE model's load-balancing coefficient (default: config.json's); `routing_replay` builds its routers
    able to replay given routing (models/routing_replay.py).
    """
    hf_config = load_hf_config(path)
    model = build_model(
        hf_config, dtype=dtype, parallel=parallel, aux_loss_coef=aux_loss_coef, routing_replay=routing_replay
    )
    if is_megatron_checkpoint(path):
        load_model_checkpoint(model, path)
    else:
        load_hf_weights(model, path, hf_config)
    return model
