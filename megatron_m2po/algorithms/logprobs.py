"""Log-probs and entropy of the sampled tokens from tensor-parallel (vocab-sharded) logits.

Why a custom autograd Function: `log_softmax` over a 152k vocabulary keeps an fp32 [tokens, vocab]
tensor alive from forward to backward (and makes two more in backward). Here the forward walks the
tokens in chunks and keeps only three floats per token (max, log-sum-exp, E_p[x]); the backward
recomputes the softmax of one chunk at a time and writes the gradient straight into a tensor of the
logits' own dtype. Peak extra memory is O(chunk_size x vocab/tp), independent of the token count.

Each rank holds the contiguous vocab slice [rank * V/tp, (rank + 1) * V/tp) of its tensor-parallel
group, the layout of Megatron's `ColumnParallelLinear` output layer and `VocabParallelEmbedding`.
Each rank reduces its shard with the fused `torch.logsumexp`; the shards are combined with two
all-reduces per call (max of the shard log-sum-exps; then the rescaled sums, target logit and E_p[x]
packed in one tensor), none in backward: the backward needs only the saved per-token statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_logprobs"]

_CHUNK_ELEMENTS = 2**24  # default chunk: ~64 MiB per fp32 temporary, whatever the vocab


def _group_rank_and_size(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _scaled_chunk(
    logits: torch.Tensor, start: int, stop: int, dtype: torch.dtype, temperature: float
) -> torch.Tensor:
    """A fresh `dtype` copy of logits[start:stop] / temperature (never a view: callers modify it in place)."""
    x = logits[start:stop].to(dtype, copy=True)
    return x if temperature == 1.0 else x.div_(temperature)


class _VocabParallelLogprobs(torch.autograd.Function):
    """Forward: (log p(target), entropy) per token. Backward: softmax recomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, target_ids, tp_group, temperature, chunk_size, with_entropy):
        rank, world = _group_rank_and_size(tp_group)
        n_tokens, local_vocab = logits.shape
        vocab_start = rank * local_vocab
        local_target = target_ids - vocab_start
        target_here = (local_target >= 0) & (local_target < local_vocab)
        local_target = torch.where(target_here, local_target, 0)
        fp = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays fp64

        # One pass per chunk: this shard's log-sum-exp (fused kernel), target logit, and E_p_local[x].
        local_lse = torch.empty(n_tokens, dtype=fp, device=logits.device)
        picked = torch.zeros(n_tokens, dtype=fp, device=logits.device)
        local_ex = torch.zeros(n_tokens, dtype=fp, device=logits.device)
        for start in range(0, n_tokens, chunk_size):
            stop = min(start + chunk_size, n_tokens)
            x = _scaled_chunk(logits, start, stop, fp, temperature)
            local_lse[start:stop] = torch.logsumexp(x, dim=-1)
            target_logit = x.gather(-1, local_target[start:stop, None]).squeeze(-1)
            picked[start:stop] = torch.where(target_here[start:stop], target_logit, 0.0)
            if with_entropy:
                p = torch.sub(x, local_lse[start:stop, None]).exp_()
                local_ex[start:stop] = torch.linalg.vecdot(p, x)
                del p
            del x

        if world > 1:  # combine shards: lse = m + log sum_r exp(lse_r - m); E[x] = sum_r w_r E_r[x]
            top = local_lse.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
            weight = torch.exp(local_lse - top)
            stats = torch.stack([weight, picked, weight * local_ex], dim=1)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
            log_z = top + torch.log(stats[:, 0])
            picked, expected_x = stats[:, 1], stats[:, 2] / stats[:, 0]
        else:
            log_z, expected_x = local_lse, local_ex
        logprobs = picked - log_z
        entropy = log_z - expected_x if with_entropy else torch.zeros_like(log_z)

        ctx.save_for_backward(logits, local_target, target_here, log_z, expected_x)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, local_target, target_here, log_z, expected_x = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad_logits = torch.empty_like(logits)
        n_tokens = logits.shape[0]
        inv_t = 1.0 / temperature  # d x / d logits
        for start in range(0, n_tokens, chunk_size):
            stop = min(start + chunk_size, n_tokens)
            x = _scaled_chunk(logits, start, stop, log_z.dtype, temperature)
            g_lp = grad_logprobs[start:stop, None].to(x.dtype)
            # d log p_y / dx_v = 1[v = y] - p_v;  dH / dx_v = -p_v (x_v - E_p[x]); in place, <= 2 temporaries
            if ctx.with_entropy:
                grad_x = torch.sub(x, log_z[start:stop, None]).exp_()  # p
                g_h = grad_entropy[start:stop, None].to(x.dtype)
                x.sub_(expected_x[start:stop, None]).mul_(grad_x).mul_(-inv_t * g_h)
                grad_x.mul_(-inv_t * g_lp).add_(x)
                del x
            else:
                grad_x = x.sub_(log_z[start:stop, None]).exp_().mul_(-inv_t * g_lp)
            onehot = torch.where(target_here[start:stop, None], inv_t * g_lp, 0.0)
            grad_x.scatter_add_(-1, local_target[start:stop, None], onehot)
            grad_logits[start:stop].copy_(grad_x)
            del grad_x
        return grad_logits, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) (and the entropy) under softmax(logits / temperature), logits sharded over the vocab.

    logits: [..., V / tp] this rank's vocab slice (any float dtype; math in fp32, or fp64 for fp64 logits).
    target_ids: [...] global token ids. tp_group: the tensor-parallel group (None = the full vocab is here;
    in Megatron pass `parallel_state.get_tensor_model_parallel_group()`). `temperature` is the engine's
    sampling temperature, so the trainer's log-probs match the engine's. Differentiable in `logits`.
    chunk_size: tokens per chunk; None picks it so one chunk's fp32 temporaries hold about 2^24 elements
    (64 MiB each, ~110 tokens of a 152k vocabulary at TP=1).
    Returns log-probs [...] (and entropy [...] when `with_entropy`) in fp32 (fp64 for fp64 logits).
    """
    if logits.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"vocab_parallel_logprobs: logits {tuple(logits.shape)} must be target_ids {tuple(target_ids.shape)} "
            "plus a trailing vocab dimension"
        )
    if not logits.is_floating_point():
        raise TypeError(f"vocab_parallel_logprobs: logits must be floating point, got {logits.dtype}")
    if temperature <= 0:
        raise ValueError(f"vocab_parallel_logprobs: temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if chunk_size < 1:
        raise ValueError(f"vocab_parallel_logprobs: chunk_size must be >= 1, got {chunk_size}")
    _, world = _group_rank_and_size(tp_group)
    full_vocab = logits.shape[-1] * world
    if target_ids.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= full_vocab):
        raise ValueError(
            f"vocab_parallel_logprobs: target_ids must lie in [0, {full_vocab}) "
            f"(vocab {logits.shape[-1]} x tp {world}); got range [{int(target_ids.min())}, {int(target_ids.max())}]"
        )
    lead_shape = target_ids.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = target_ids.reshape(-1).long()
    logprobs, entropy = _VocabParallelLogprobs.apply(
        flat_logits, flat_targets, tp_group, float(temperature), int(chunk_size), bool(with_entropy)
    )
    if with_entropy:
        return logprobs.view(lead_shape), entropy.view(lead_shape)
    return logprobs.view(lead_shape)
