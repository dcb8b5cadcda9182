"""Fill a live Megatron model (this rank's shard) from an HF safetensors dir, reading only this rank's bytes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_m2po.checkpoint.hf_io import HFSafetensorsReader
from megatron_m2po.models.builder import unwrap_model
from megatron_m2po.models.mapping import (
    Layout,
    WeightRule,
    global_rules,
    hf_names,
    hf_slices_for_rank,
    layer_rules,
    local_experts,
    megatron_name,
    tied_output_rule,
    to_megatron_shard,
)

logger = logging.getLogger(__name__)


def local_rules(model, hf_config) -> Iterator[tuple[WeightRule, str, int | None, int | None]]:
    """(rule, megatron parameter name, global layer, global expert) for every parameter this rank holds."""
    gpt = unwrap_model(model)
    params = dict(gpt.named_parameters())
    te = any(name.endswith("layer_norm_weight") for name in params)
    offset = get_transformer_layer_offset(gpt.config)
    rules = list(global_rules(hf_config))
    if gpt.post_process and gpt.share_embeddings_and_output_weights and not gpt.pre_process:
        rules.append(tied_output_rule())
    for rule in rules:
        name = megatron_name(rule)
        if name in params:
            yield rule, name, None, None
    experts = local_experts(
        hf_config,
        parallel_state.get_expert_model_parallel_rank(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    for local_layer in range(len(gpt.decoder.layers)):
        for rule in layer_rules(hf_config):
            if not rule.per_expert:
                yield (
                    rule,
                    megatron_name(rule, local_layer, transformer_engine=te),
                    offset + local_layer,
                    None,
                )
                continue
            for i, expert in enumerate(experts):
                name = megatron_name(rule, local_layer, transformer_engine=te, local_expert=i)
                yield rule, name, offset + local_layer, expert


def split_ranks(rule: WeightRule) -> tuple[int, int]:
    """(rank, size) of the tensor-parallel group that splits this rule's parameter: experts use the
    expert-tensor-parallel group, everything else the tensor-parallel group."""
    if rule.per_expert:
        return (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def load_hf_weights(model, hf_dir: str | Path, hf_config) -> None:
    """Copy the HF weights into this rank's parameters; every parameter must be covered exactly once."""
    gpt = unwrap_model(model)
    params = dict(gpt.named_parameters())
    layout = Layout.from_hf_config(hf_config)
    filled: set[str] = set()
    with HFSafetensorsReader(hf_dir) as reader, torch.no_grad():
        for rule, name, layer, expert in local_rules(gpt, hf_config):
            if name not in params:
                raise KeyError(f"megatron parameter {name!r} (from {rule.hf}) not found in the model")
            tp_rank, tp_size = split_ranks(rule)
            names = hf_names(rule, layer, expert)
            shapes = [reader.shape(n) for n in names]
            slices = hf_slices_for_rank(rule, layout, shapes, tp_rank, tp_size)
            parts = [reader.read(n, s) for n, s in zip(names, slices)]
            shard = to_megatron_shard(rule, layout, parts, tp_size)
            param = params[name]
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(
                    f"{hf_dir}: {names} give shape {tuple(shard.shape)} for {name!r}, the model expects "
                    f"{tuple(param.shape)} (config.json and weights disagree?)"
                )
            param.copy_(shard)
            filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise KeyError(f"{hf_dir}: no mapping filled megatron parameters {missing}")
    logger.info("loaded %d tensors from %s", len(filled), hf_dir)
