"""Replaying the engine's expert choices in the trainer's forward (Megatron-core's RouterReplay).

Without replay the trainer's routers choose their own top-k, and wherever that differs from what the engine
routed to, the importance ratio measures router disagreement instead of the policy's change. With replay
every router takes the given experts and only recomputes their probabilities from its own logits, so the
gradient still reaches the router weights through the chosen experts' scores.

Routed experts come per token as [batch, seq, layers, top_k] (the layer index is the global one, 0-based);
Megatron's routers see the tokens of a [seq, batch] activation flattened sequence-major (with sequence
parallelism, only this TP rank's contiguous share of the sequence), which is what `replayed_routing` hands
them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from megatron_m2po.models.builder import unwrap_model


def model_routers(model) -> dict[int, TopKRouter]:
    """This stage's routers by global layer index (0-based); they must be built with routing replay on."""
    routers = {m.layer_number - 1: m for m in unwrap_model(model).modules() if isinstance(m, TopKRouter)}
    missing = [layer for layer, router in routers.items() if router.router_replay is None]
    if missing:
        raise ValueError(
            f"layers {missing} have no RouterReplay: build the model with routing_replay=True "
            "(algorithm.routing_replay: replay)"
        )
    return routers


def routers_share(routers: dict[int, TopKRouter], per_token: torch.Tensor) -> torch.Tensor:
    """The part of a per-token tensor [batch, seq, ...] that this rank's routers see: with sequence
    parallelism, this TP rank's contiguous 1/tp of the sequence; else all of it."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if not routers or tp == 1 or not next(iter(routers.values())).config.sequence_parallel:
        return per_token
    chunk = per_token.shape[1] // tp
    rank = parallel_state.get_tensor_model_parallel_rank()
    return per_token[:, rank * chunk : (rank + 1) * chunk]


def sequence_major(per_token: torch.Tensor) -> torch.Tensor:
    """[batch, seq, ...] -> [seq * batch, ...]: the token order of Megatron's [seq, batch] activations."""
    return per_token.transpose(0, 1).reshape(-1, *per_token.shape[2:])


@contextmanager
def replayed_routing(model, routed_experts: torch.Tensor) -> Iterator[None]:
    """Within the block, every router of `model` routes the tokens of a [batch, seq] forward to the experts in
    `routed_experts` [batch, seq, layers, top_k].

    Under full activation recompute the backward runs each layer's forward again, after the block: the routers
    are then left replaying backward, and each recomputation takes the oldest pending routing (megatron-core's
    REPLAY_BACKWARD list), which is the right one because micro-batches run their backward in forward order
    (no pipelining and 1F1B alike). `clear_replay` empties what a forward-only pass left pending."""
    routers = model_routers(model)
    if routed_experts.dim() != 4:
        raise ValueError(
            f"routed_experts: expected [batch, seq, layers, top_k], got {tuple(routed_experts.shape)}"
        )
    layers, top_k = routed_experts.shape[2:]
    routed_experts = routers_share(routers, routed_experts)
    for layer, router in routers.items():
        if layer >= layers:
            raise ValueError(f"routed_experts has {layers} layers, the model routes at layer {layer}")
        if top_k != router.topk:
            raise ValueError(f"routed_experts has top_k={top_k}, the model's routers take {router.topk}")
        per_token = sequence_major(routed_experts[:, :, layer, :]).long()
        if per_token.numel() and (per_token.min() < 0 or per_token.max() >= router.config.num_moe_experts):
            raise ValueError(
                f"routed_experts at layer {layer}: expert ids outside [0, {router.config.num_moe_experts})"
            )
        replay = router.router_replay
        recomputed = router.config.recompute_granularity == "full"
        if not recomputed:
            replay.clear_indices()
        replay.set_target_indices(per_token)  # also queued for the backward's recomputation
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for router in routers.values():
            replay = router.router_replay
            replay.target_topk_idx = None
            if router.config.recompute_granularity == "full":
                replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
            else:
                replay.clear_router_replay_action()
                replay.clear_indices()


def clear_replay(model) -> None:
    """No routing pending for a backward and no replay action set (before a schedule: a forward-only pass
    under full recompute leaves its micro-batches' routing queued)."""
    for router in unwrap_model(model).modules():
        if isinstance(router, TopKRouter) and router.router_replay is not None:
            router.router_replay.clear_router_replay_action()
            router.router_replay.clear_indices()


@contextmanager
def recorded_routing(model) -> Iterator[dict[int, torch.Tensor]]:
    """Record the routers' own top-k: after the block, {layer: [seq * batch, top_k]} (sequence-major)."""
    routers = model_routers(model)
    seen: dict[int, torch.Tensor] = {}
    for router in routers.values():
        router.router_replay.clear_indices()
        router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield seen
        for layer, router in routers.items():
            seen[layer] = router.router_replay.get_recorded_indices()
    finally:
        for router in routers.values():
            router.router_replay.clear_router_replay_action()
            router.router_replay.clear_indices()
