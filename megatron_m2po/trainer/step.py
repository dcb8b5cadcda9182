"""One optimizer update on one mini-batch: micro-batches through Megatron's pipeline schedule, then the step.

The loss of a mini-batch is a token mean over ALL its response tokens, on every DP rank and in every
micro-batch. Megatron's schedule divides each micro-batch's loss by the number of micro-batches and DDP
averages gradients over DP ranks; the loss functions take a `normalizer` (the mini-batch's token count
divided by the DP size, see `algorithms.get_loss`), and `loss_func` below multiplies back the schedule's
1/num_microbatches, so the gradient is exactly that of the global token mean.

A loss that says it needs log pi_theta of the whole mini-batch before the update
(`PolicyLoss.needs_current_logprobs`) turns it into each micro-batch's extra inputs
(`PolicyLoss.inputs_before_update`): `m2po` in `global` scope its threshold over the DP group, `decoupled_ppo`
its proximal log-probs. When one micro-batch per rank holds the whole mini-batch, the training forward's own
detached log-probs are exactly those (same weights, same input), so the loss function computes them there; with
more micro-batches a no-grad pre-pass (`forward_logprobs_collective`) computes them first, since the first
micro-batch's loss needs every micro-batch's log-probs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_m2po import algorithms, platform
from megatron_m2po.models.routing_replay import clear_replay, recorded_routing, replayed_routing
from megatron_m2po.trainer.batching import MicroBatch
from megatron_m2po.trainer.context_parallel import context_share, next_tokens


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    b, L = tokens.shape
    return torch.arange(L, device=tokens.device).unsqueeze(0).expand(b, L)


def run_model(model_chunk, mb: MicroBatch, *, replay: bool = True) -> torch.Tensor:
    """The model's output for one micro-batch: padded [b, L, ...], or packed [1, T, ...] through Megatron's THD
    path (`PackedSeqParams`; rotary positions restart at every `cu_seqlens` bound). Under context parallelism
    only this CP rank's share of the positions ([b, L / cp, ...], `context_parallel.py`). A micro-batch
    carrying the engine's routed experts is run with its routers replaying them (unless `replay` is False)."""
    share = context_share(mb)
    routed = mb.routed_experts if mb.packed is None else mb.packed.routed_experts
    if routed is None or not replay:
        return _run_model(model_chunk, mb, share)
    with replayed_routing(model_chunk, routed if share is None else share.take(routed)):
        return _run_model(model_chunk, mb, share)


def _run_model(model_chunk, mb: MicroBatch, share) -> torch.Tensor:
    if mb.packed is None:
        tokens, positions, params = mb.tokens, _positions(mb.tokens), None
    else:
        p = mb.packed
        cu = p.cu_seqlens.to(device=mb.tokens.device, dtype=torch.int32)
        tokens, positions = p.tokens, p.position_ids
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=p.max_seqlen,
            max_seqlen_kv=p.max_seqlen,
        )
    if share is not None:
        tokens, positions = share.take(tokens), share.take(positions)
    return model_chunk(tokens, positions, None, packed_seq_params=params)


def _schedule_kwargs(micro_batches: Sequence[MicroBatch]) -> dict[str, Any]:
    first = micro_batches[0]
    b, L = (first.packed or first).tokens.shape
    return {"num_microbatches": len(micro_batches), "seq_length": L, "micro_batch_size": b}


def token_logprobs(output: torch.Tensor, mb: MicroBatch, temperature: float, *, with_entropy: bool = False):
    """Log-probs (and entropy) of `mb.targets` [b, L-1] from this TP rank's logits shard ([b, L, V/tp], or
    [1, T, V/tp] packed: computed on the packed tokens only, then laid out as the padded targets). Under
    context parallelism the logits are this CP rank's positions; the results of every CP rank are gathered
    back into sequence order first."""
    share = context_share(mb)
    row = mb.tokens if mb.packed is None else mb.packed.tokens
    if share is None:
        logits, targets = output[:, :-1, :], row[:, 1:]
    else:
        logits, targets = output, share.take(next_tokens(row))
    out = algorithms.vocab_parallel_logprobs(
        logits,
        targets,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        temperature=temperature,
        with_entropy=with_entropy,
    )
    out = out if with_entropy else (out,)
    if share is not None:
        out = tuple(share.gather(t)[:, :-1] for t in out)
    if mb.packed is not None:
        out = tuple(mb.packed.unpack(t) for t in out)
    return out if with_entropy else out[0]


@torch.no_grad()
def forward_logprobs_collective(
    model,
    micro_batches: Sequence[MicroBatch],
    temperature: float,
    *,
    replay: bool = True,
    on_routing: Callable[[MicroBatch, dict[int, torch.Tensor]], None] | None = None,
) -> list[torch.Tensor]:
    """log pi_theta of every micro-batch's targets [b, L-1] (on the last pipeline stage; [] elsewhere).

    `replay=False`: the routers choose their own experts; `on_routing(mb, {layer: [tokens, top_k]})` is then
    told what this stage's routers chose for each micro-batch (an MoE model built with routing replay)."""
    device = next(model.parameters()).device

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator).to(device)
        if on_routing is None or replay:
            output = run_model(model_chunk, mb, replay=replay)
        else:
            with recorded_routing(model_chunk) as own:
                output = run_model(model_chunk, mb, replay=False)
            on_routing(mb, own)

        def loss_func(out):
            lp = token_logprobs(out, mb, temperature)
            return out.new_zeros(()), {"logprobs": lp.detach().float()}

        return output, loss_func

    clear_replay(model)
    store = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        forward_only=True,
        **_schedule_kwargs(micro_batches),
    )
    return [d["logprobs"] for d in store] if parallel_state.is_pipeline_last_stage() else []


def _all_reduce_metrics(per_microbatch: list[dict[str, float]], group) -> dict[str, float]:
    """Mean over micro-batches and DP ranks (max for `*_max` keys, sum for `*num_tokens`)."""
    keys = sorted({k for d in per_microbatch for k in d})
    if group is not None and dist.get_world_size(group) > 1:
        gathered: list[list[str]] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
        dist.all_gather_object(gathered, keys, group=group)
        keys = sorted({k for ks in gathered for k in ks})
    # Accumulated in Python floats; as tensors moved to the collective's device (NCCL needs CUDA tensors).
    sum_list, max_list, count_list = [0.0] * len(keys), [-math.inf] * len(keys), [0.0] * len(keys)
    for d in per_microbatch:
        for i, k in enumerate(keys):
            if k in d:
                v = float(d[k])
                sum_list[i] += v
                max_list[i] = max(max_list[i], v)
                count_list[i] += 1
    sums = torch.tensor(sum_list, dtype=torch.float64)
    maxes = torch.tensor(max_list, dtype=torch.float64)
    counts = torch.tensor(count_list, dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        device = platform.device()
        sums, counts, maxes = sums.to(device), counts.to(device), maxes.to(device)
        dist.all_reduce(sums, group=group)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        sums, counts, maxes = sums.cpu(), counts.cpu(), maxes.cpu()
    out = {}
    for i, k in enumerate(keys):
        if counts[i] == 0:
            continue
        if k.endswith("_max"):
            out[k] = maxes[i].item()
        elif k.endswith("num_tokens"):
            out[k] = sums[i].item()
        else:
            out[k] = (sums[i] / counts[i]).item()
    return out


def _inputs_before_update_collective(loss_fn, current, micro_batches, device, dp_group) -> list[dict]:
    """Each micro-batch's extra loss inputs from the mini-batch's log-probs before the update (`current`).

    Collective over the DP group (m2po's threshold): called on the last pipeline stage of every DP rank."""
    return loss_fn.inputs_before_update(
        algorithms.CurrentLogprobs(
            current,
            [m.behavior_logprobs.to(device) for m in micro_batches],
            [m.advantages.to(device) for m in micro_batches],
            [m.response_mask.to(device) for m in micro_batches],
            process_group=dp_group,
            engine_logprobs=[m.engine_logprobs.to(device) for m in micro_batches]
            if loss_fn.needs_engine_logprobs
            else None,
        )
    )


def _pre_pass_collective(model, micro_batches, loss_fn, temperature, device, dp_group) -> list[dict] | None:
    """`_inputs_before_update_collective` from a no-grad forward of every micro-batch (every rank runs it; None
    off the last pipeline stage, which computes no loss)."""
    current = forward_logprobs_collective(model, micro_batches, temperature)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return _inputs_before_update_collective(loss_fn, current, micro_batches, device, dp_group)


def train_update_collective(
    model,
    optimizer,
    scheduler,
    micro_batches: Sequence[MicroBatch],
    loss_fn: algorithms.PolicyLoss,
    *,
    temperature: float,
    normalizer: float,
    force_pre_pass: bool = False,
) -> dict[str, float]:
    """Forward/backward every micro-batch, one optimizer step; returns `loss/` and `train/` metrics.

    A loss that needs the log-probs before the update takes them from its own forward when this rank has one
    micro-batch (the count is the same on every rank: `plan_microbatches`), else from a pre-pass;
    `force_pre_pass` runs the pre-pass anyway (the tests compare the two)."""
    device = next(model.parameters()).device
    num_mb = len(micro_batches)
    dp_group = parallel_state.get_data_parallel_group()
    needs_current = loss_fn.needs_current_logprobs
    in_forward = needs_current and num_mb == 1 and not force_pre_pass
    loss_inputs = None
    if needs_current and not in_forward:
        loss_inputs = _pre_pass_collective(model, micro_batches, loss_fn, temperature, device, dp_group)
    index = iter(range(num_mb))

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator).to(device)
        i = next(index)
        output = run_model(model_chunk, mb)

        def loss_collective(out):  # collective over DP for m2po's threshold
            lp, entropy = token_logprobs(out, mb, temperature, with_entropy=True)
            optional: dict[str, Any] = {
                "staleness": mb.staleness,
                "normalizer": normalizer,
                "process_group": dp_group,
            }
            if (
                in_forward
            ):  # the pre-pass's value: same weights and micro-batch as forward_logprobs_collective
                current = [lp.detach().float()]
                optional.update(_inputs_before_update_collective(loss_fn, current, [mb], device, dp_group)[0])
            elif loss_inputs is not None:
                optional.update(loss_inputs[i])
            if loss_fn.needs_engine_logprobs:
                optional["engine_logprobs"] = mb.engine_logprobs
            loss, metrics = loss_fn(lp, mb.behavior_logprobs, mb.advantages, mb.response_mask, **optional)
            mask = mb.response_mask
            metrics = dict(metrics)
            metrics["loss/entropy"] = float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
            metrics["loss/value"] = float(loss.detach())
            if (
                not mask.any()
            ):  # a filler micro-batch (token budget): no tokens, no say in the diagnostics' means
                metrics = {"loss/value": metrics["loss/value"]}
            # The schedule divides by num_microbatches; the normalizer already made this a share of the mean.
            return loss * num_mb, metrics

        return output, loss_collective

    model.zero_grad_buffer()
    optimizer.zero_grad()
    clear_replay(model)  # full recompute: each micro-batch's routing is queued for its backward
    store = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        forward_only=False,
        **_schedule_kwargs(micro_batches),
    )
    update_ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)

    metrics: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage():
        metrics = _all_reduce_metrics(list(store), dp_group)
        # loss/value: a micro-batch's loss is its share of the DP-averaged mean, so the mini-batch loss is
        # the sum over micro-batches of the mean over DP ranks = (mean over both) x num_microbatches.
        if "loss/value" in metrics:
            metrics["loss/value"] *= num_mb
    metrics["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["train/lr"] = float(optimizer.param_groups[0]["lr"])
    metrics["train/update_skipped"] = 0.0 if update_ok else 1.0
    return metrics
