"""How much routing replay changes: engine-trainer router agreement and M2 with and without replay.

Two no-grad forwards of the mini-batch before the update (the weights the loss sees): one with the routers
choosing their own experts, recording them, one replaying the engine's. Per token of the responses (the
positions whose outputs give the response log-probs), the trainer's own top-k set is compared with the
engine's in every MoE layer; and the M2 before masking, the mean of (log pi_theta - log mu)^2 over the
trust-region tokens as `loss/m2_before` defines it, is computed from each forward. Without replay an MoE
policy's M2 counts router disagreement as policy change; the difference between the two is that share.

moe/router_agreement      token-layers whose top-k expert set equals the engine's / token-layers
moe/m2_before_replay      M2 before masking, the trainer's forward replaying the engine's routing
moe/m2_before_no_replay   the same, its routers choosing their own experts
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_m2po import algorithms, platform
from megatron_m2po.models.routing_replay import model_routers, routers_share, sequence_major
from megatron_m2po.trainer.batching import MicroBatch
from megatron_m2po.trainer.context_parallel import context_share
from megatron_m2po.trainer.step import forward_logprobs_collective


def response_positions(mb: MicroBatch) -> torch.Tensor:
    """bool [b, L] (or [1, T] packed): the input positions whose next token is a response token in the loss,
    laid out as the model's input."""
    fed = torch.nn.functional.pad(mb.response_mask > 0, (0, 1))  # position j predicts target j
    if mb.packed is None:
        return fed
    packed = torch.zeros_like(mb.packed.tokens, dtype=torch.bool)
    slots = (mb.packed.index >= 0) & fed[:, :-1]
    packed[0, mb.packed.index[slots]] = True
    return packed


def agreement_counts(
    routers: dict, own: dict[int, torch.Tensor], mb: MicroBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-layers whose own top-k set equals the engine's, token-layers compared) of one micro-batch on
    this rank's routers (its CP and sequence-parallel share of the positions); `own` = {layer: [tokens, top_k]} as `recorded_routing` gives them."""
    routed = mb.routed_experts if mb.packed is None else mb.packed.routed_experts
    positions = response_positions(mb)
    share = context_share(mb)  # context parallelism: this CP rank routes its share of the positions
    if share is not None:
        routed, positions = share.take(routed), share.take(positions)
    mask = sequence_major(routers_share(routers, positions))
    engine = sequence_major(routers_share(routers, routed))
    agree = torch.zeros((), dtype=torch.float64)
    for layer, chosen in own.items():
        same = (chosen.sort(-1).values == engine[:, layer].to(chosen).sort(-1).values).all(-1)
        agree += (same & mask).sum().double().cpu()
    return agree, mask.sum().double().cpu() * len(own)


def _m2_before(logprobs: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of (log r)^2 over the trust-region tokens, their number)."""
    log_ratio = logprobs - mb.behavior_logprobs.to(logprobs)
    mask = mb.response_mask.to(logprobs.device) > 0
    trust = algorithms.trust_region_mask(log_ratio, mb.advantages.to(logprobs), mask)
    return (log_ratio.square() * trust).sum().double().cpu(), trust.sum().double().cpu()


@torch.no_grad()
def routing_diagnostics_collective(
    model, micro_batches: Sequence[MicroBatch], temperature: float
) -> dict[str, float]:
    """The `moe/` metrics of this mini-batch (module docstring); collective over every rank."""
    routers = model_routers(model)
    # agree, compared, m2 replay, trust replay, m2 free, trust free
    sums = torch.zeros(6, dtype=torch.float64)

    def count(mb: MicroBatch, own: dict[int, torch.Tensor]) -> None:
        agree, compared = agreement_counts(routers, own, mb)
        sums[0] += agree
        sums[1] += compared

    free = forward_logprobs_collective(model, micro_batches, temperature, replay=False, on_routing=count)
    replayed = forward_logprobs_collective(model, micro_batches, temperature)
    if parallel_state.is_pipeline_last_stage():
        for mb, lp_replay, lp_free in zip(micro_batches, replayed, free, strict=True):
            for offset, lp in ((2, lp_replay), (4, lp_free)):
                m2, trust = _m2_before(lp, mb)
                sums[offset] += m2
                sums[offset + 1] += trust
    if dist.is_initialized() and dist.get_world_size() > 1:
        # every rank's own tokens and layers (TP ranks without sequence parallelism count the same tokens,
        # numerator and denominator alike): sums over the world give the means
        sums = sums.to(platform.device())
        dist.all_reduce(sums)
        sums = sums.cpu()
    out = {"moe/router_agreement": float(sums[0] / sums[1].clamp(min=1))}
    out["moe/m2_before_replay"] = float(sums[2] / sums[3].clamp(min=1))
    out["moe/m2_before_no_replay"] = float(sums[4] / sums[5].clamp(min=1))
    return out
