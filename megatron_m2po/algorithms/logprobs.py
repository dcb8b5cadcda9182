"""Log-probs and entropy of the sampled tokens from tensor-parallel (vocab-sharded) logits.

Why a custom autograd Function: `log_softmax` over a 152k vocabulary keeps an fp32 [tokens, vocab]
tensor alive from forward to backward (and makes two more in backward). Here the forward walks the
tokens in chunks and keeps only three floats per token (max, log-sum-exp, E_p[x]); the backward
recomputes the softmax of one chunk at a time and writes the gradient straight into a tensor of the
logits' own dtype. Peak extra memory is O(chunk_size x vocab/tp), independent of the token count.

Each rank holds the contiguous vocab slice [rank * V/tp, (rank + 1) * V/tp) of its tensor-parallel
group, the layout of Megatron's `ColumnParallelLinear` output layer and `VocabParallelEmbedding`.
Two all-reduces per call (max; then sum-exp, target logit and sum p*x packed in one tensor), none
in backward: the backward needs only the saved per-token statistics.
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


class _VocabParallelLogProbs(torch.autograd.Function):
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

        # Pass 1: max of the scaled logits (max commutes with division by a positive temperature).
        row_max = torch.empty(n_tokens, dtype=fp, device=logits.device)
        for start in range(0, n_tokens, chunk_size):
            chunk = logits[start : start + chunk_size]
            row_max[start : start + chunk_size] = chunk.max(dim=-1).values.to(fp) / temperature
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)

        # Pass 2: sum exp(x - max), target logit, sum exp(x - max) * x, in one buffer for one all-reduce.
        stats = torch.zeros(n_tokens, 3, dtype=fp, device=logits.device)
        for start in range(0, n_tokens, chunk_size):
            stop = min(start + chunk_size, n_tokens)
            x = (
                logits[start:stop].to(fp, copy=True).div_(temperature)
            )  # in-place ops: two chunk temporaries at most
            e = torch.sub(x, row_max[start:stop, None]).exp_()
            stats[start:stop, 0] = e.sum(dim=-1)
            picked = x.gather(-1, local_target[start:stop, None]).squeeze(-1)
            stats[start:stop, 1] = torch.where(target_here[start:stop], picked, 0.0)
            if with_entropy:
                stats[start:stop, 2] = torch.linalg.vecdot(e, x)
            del x, e
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)

        log_z = row_max + torch.log(stats[:, 0])
        log_probs = stats[:, 1] - log_z
        expected_x = stats[:, 2] / stats[:, 0]  # E_p[x]; entropy = log Z - E_p[x]
        entropy = log_z - expected_x if with_entropy else torch.zeros_like(log_z)

        ctx.save_for_backward(logits, local_target, target_here, log_z, expected_x)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, local_target, target_here, log_z, expected_x = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad_logits = torch.empty_like(logits)
        n_tokens = logits.shape[0]
        for start in range(0, n_tokens, chunk_size):
            stop = min(start + chunk_size, n_tokens)
            x = logits[start:stop].to(log_z.dtype, copy=True).div_(temperature)
            grad_x = torch.sub(x, log_z[start:stop, None]).exp_()  # p
            # d log p_y / dx_v = 1[v = y] - p_v;  dH / dx_v = -p_v (x_v - E_p[x])
            if ctx.with_entropy:
                x.sub_(expected_x[start:stop, None]).mul_(grad_x).mul_(
                    -grad_entropy[start:stop, None].to(x.dtype)
                )
            grad_x.mul_(-grad_log_probs[start:stop, None].to(x.dtype))
            if ctx.with_entropy:
                grad_x.add_(x)
            del x
            onehot_grad = torch.where(
                target_here[start:stop], grad_log_probs[start:stop].to(grad_x.dtype), 0.0
            )
            grad_x.scatter_add_(-1, local_target[start:stop, None], onehot_grad[:, None])
            grad_logits[start:stop].copy_(grad_x.div_(temperature))
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
    log_probs, entropy = _VocabParallelLogProbs.apply(
        flat_logits, flat_targets, tp_group, float(temperature), int(chunk_size), bool(with_entropy)
    )
    if with_entropy:
        return log_probs.view(lead_shape), entropy.view(lead_shape)
    return log_probs.view(lead_shape)
