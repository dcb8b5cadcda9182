"""`iter_hf_tensors`: full HF-named tensors of a live (TP/PP/EP-sharded) Megatron model, one at a time.

Used by the online weight sync and by tests; memory is bounded by one full tensor (plus its TP shards),
and for MoE layers by one expert tensor per expert-parallel rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_m2po.models.builder import unwrap_model
from megatron_m2po.models.mapping import (
    Layout,
    WeightRule,
    global_rules,
    hf_names,
    layer_rules,
    megatron_name,
    num_experts,
    to_hf_tensors,
)


def hf_tensor_shapes(rule: WeightRule, hf_config) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors a rule produces (so receivers can allocate without a shape handshake)."""
    layout = Layout.from_hf_config(hf_config)
    hidden, ffn, vocab = hf_config.hidden_size, hf_config.intermediate_size, hf_config.vocab_size
    if rule.per_expert:
        ffn = hf_config.moe_intermediate_size
    q, kv = layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim
    by_suffix = {
        "mlp.gate.weight": [(num_experts(hf_config), hidden)],
        "embed_tokens.weight": [(vocab, hidden)],
        "lm_head.weight": [(vocab, hidden)],
        "norm.weight": [(hidden,)],
        "layernorm.weight": [(hidden,)],
        "q_norm.weight": [(layout.head_dim,)],
        "k_norm.weight": [(layout.head_dim,)],
        "q_proj.weight": [(q, hidden), (kv, hidden), (kv, hidden)],
        "q_proj.bias": [(q,), (kv,), (kv,)],
        "o_proj.weight": [(hidden, q)],
        "gate_proj.weight": [(ffn, hidden), (ffn, hidden)],
        "down_proj.weight": [(hidden, ffn)],
    }
    for suffix, shapes in sorted(by_suffix.items(), key=lambda item: -len(item[0])):  # most specific first
        if rule.hf[0].endswith(suffix):
            return shapes
    raise KeyError(f"no shape rule for {rule.hf[0]}")


def _stage_of_layer(layer: int, hf_config) -> int:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    return layer // (hf_config.num_hidden_layers // pp)


def iter_hf_tensors(model, hf_config) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield (hf_name, full tensor) for every HF weight, in HF order (embeddings, layers, norm, lm_head).

    Collective: every rank of the model-parallel group (with experts: of the whole expert-parallel grid) must
    iterate it to the end in lockstep. Real tensors are yielded on the model-parallel source rank (tp_rank 0
    and pp_rank 0, in every data-parallel replica); every other rank yields the same names with `None`.
    Tensors are on the model's device in its dtype. Experts come one per EP rank at a time (expert i of
    every rank's block), so within a layer they are not in index order.
    """
    gpt = unwrap_model(model)
    params = dict(gpt.named_parameters())
    te = any(name.endswith("layer_norm_weight") for name in params)
    layout = Layout.from_hf_config(hf_config)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_last = parallel_state.get_pipeline_model_parallel_world_size() - 1
    offset = get_transformer_layer_offset(gpt.config)
    dtype = gpt.config.params_dtype
    dev = next(iter(params.values())).device

    items: list[tuple[WeightRule, int | None, int]] = []
    globals_ = global_rules(hf_config)
    items.append((globals_[0], None, 0))  # embeddings live on the first stage
    for layer in range(hf_config.num_hidden_layers):
        items.extend((rule, layer, _stage_of_layer(layer, hf_config)) for rule in layer_rules(hf_config))
    items.extend((rule, None, pp_last) for rule in globals_[1:])  # final norm, lm head: last stage

    for rule, layer, owner in items:
        if rule.per_expert:
            yield from _expert_tensors(gpt, params, te, rule, layer, owner, hf_config)
            continue
        names = hf_names(rule, layer)
        full: list[torch.Tensor] | None = None
        if pp_rank == owner:
            local = None if layer is None else layer - offset
            shard = params[megatron_name(rule, local, transformer_engine=te)].detach()
            if rule.split == "replicated" or tp_size == 1:
                shards = [shard] * (1 if rule.split == "replicated" else tp_size)
            else:
                shards = [torch.empty_like(shard) for _ in range(tp_size)]
                torch.distributed.all_gather(shards, shard.contiguous(), group=tp_group)
            if tp_rank == 0:
                full = to_hf_tensors(rule, layout, shards)
        full = _to_first_stage(full, rule, owner, hf_config, dtype, dev)
        is_source = tp_rank == 0 and pp_rank == 0
        for i, name in enumerate(names):
            yield name, (full[i] if is_source else None)


def _to_first_stage(full, rule: WeightRule, owner: int, hf_config, dtype, dev):
    """Move the HF tensors of a rule from the owning pipeline stage to stage 0 (tp_rank 0 of each)."""
    if owner == 0 or parallel_state.get_tensor_model_parallel_rank() != 0:
        return full
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_ranks = torch.distributed.get_process_group_ranks(pp_group)
    if pp_rank == owner:
        for tensor in full:
            torch.distributed.send(tensor.contiguous(), dst=pp_ranks[0], group=pp_group)
        return None
    if pp_rank == 0:
        full = [torch.empty(s, dtype=dtype, device=dev) for s in hf_tensor_shapes(rule, hf_config)]
        for tensor in full:
            torch.distributed.recv(tensor, src=pp_ranks[owner], group=pp_group)
    return full


def _gather(tensor: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _expert_tensors(gpt, params, te: bool, rule: WeightRule, layer: int, owner: int, hf_config):
    """The HF tensors of one per-expert rule of one layer, for every expert of the model.

    Each expert-parallel rank holds a contiguous block of experts; for local index i the EP ranks
    all-gather their expert i (after its expert-TP shards are gathered), so every rank of the owning stage
    holds one expert per EP rank at a time, then stage 0 receives them as for any other tensor.
    """
    layout = Layout.from_hf_config(hf_config)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    is_source = parallel_state.get_tensor_model_parallel_rank() == 0 and pp_rank == 0
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    per_rank = num_experts(hf_config) // ep_size
    dtype, dev = gpt.config.params_dtype, next(iter(params.values())).device
    for i in range(per_rank):
        by_rank: list[list[torch.Tensor] | None] = [None] * ep_size
        if pp_rank == owner:
            name = megatron_name(
                rule, layer - get_transformer_layer_offset(gpt.config), transformer_engine=te, local_expert=i
            )
            shards = _gather(
                params[name].detach(), parallel_state.get_expert_tensor_parallel_group(), etp_size
            )
            mine = to_hf_tensors(rule, layout, shards)
            gathered = [_gather(t, parallel_state.get_expert_model_parallel_group(), ep_size) for t in mine]
            by_rank = [[part[r] for part in gathered] for r in range(ep_size)]
        for r in range(ep_size):
            full = _to_first_stage(by_rank[r], rule, owner, hf_config, dtype, dev)
            names = hf_names(rule, layer, r * per_rank + i)
            for j, name in enumerate(names):
                yield name, (full[j] if is_source else None)
