"""torchrun --nproc-per-node 2: global M2 threshold (DP=2 == DP=1 == any micro-batch split) and TP=2 log-probs.

Every rank builds the same full batch from one seed, then takes its share, so the single-process answer
is available on every rank to compare against.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from megatron_m2po.algorithms import compute_m2_threshold, get_loss, vocab_parallel_logprobs


def heavy_tailed_batch(seed: int, rows: int = 16, cols: int = 40):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 4
    noise = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.15
    spikes = (
        (torch.rand(rows, cols, generator=g) < 0.05)
        * torch.randn(rows, cols, generator=g, dtype=torch.float64)
        * 2
    )
    blp = lp - noise - spikes
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, cols).contiguous()
    mask = torch.rand(rows, cols, generator=g) > 0.15
    return lp, blp, adv, mask


def check_global_m2(rank: int, world: int) -> None:
    for seed in range(3):
        lp, blp, adv, mask = heavy_tailed_batch(seed)
        if seed == 2:
            mask[1::2] = False  # rank 1 holds no response tokens at all
        whole = compute_m2_threshold(lp, blp, adv, mask, m2_budget=0.04)  # DP=1, one micro-batch
        assert not math.isinf(whole), "the test batch must need masking"
        mine = slice(rank, None, world)  # this rank's sequences (interleaved)
        micro = [slice(0, 1), slice(1, 3), slice(3, 5), slice(5, 8)]  # 4 uneven micro-batches of 8 rows
        local = [t[mine] for t in (lp, blp, adv, mask)]
        split = compute_m2_threshold(
            *[[t[m] for m in micro] for t in local], process_group=dist.group.WORLD, m2_budget=0.04
        )
        assert split == whole, (seed, split, whole)

        # the loss with that threshold: same mask, same loss and gradients as the whole batch in one process
        loss = get_loss("m2po")
        x_whole = lp.clone().requires_grad_()
        value_whole, metrics_whole = loss(x_whole, blp, adv, mask, m2_threshold=whole)
        value_whole.backward()
        normalizer = float(mask.sum())
        x = local[0].clone().requires_grad_()
        total = 0.0
        for m in micro:
            part, _ = loss(
                x[m], local[1][m], local[2][m], local[3][m], m2_threshold=split, normalizer=normalizer
            )
            part.backward()
            total += part.item()
        summed = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(summed)
        assert abs(summed.item() - value_whole.item()) < 1e-12, (summed.item(), value_whole.item())
        torch.testing.assert_close(x.grad, x_whole.grad[mine], rtol=0, atol=1e-15)
        assert metrics_whole["loss/masked_fraction"] > 0


def check_vocab_parallel(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(7)
    vocab = 96
    logits = torch.randn(3, 11, vocab, generator=g, dtype=torch.float64) * 5
    targets = torch.randint(0, vocab, (3, 11), generator=g)
    up = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    shard = slice(rank * vocab // world, (rank + 1) * vocab // world)

    def run(x, group):
        lp, ent = vocab_parallel_logprobs(
            x, targets, tp_group=group, temperature=0.8, chunk_size=4, with_entropy=True
        )
        ((lp * up[0]).sum() + (ent * up[1]).sum()).backward()
        return lp.detach(), ent.detach()

    x_tp = logits[..., shard].clone().requires_grad_()
    lp_tp, ent_tp = run(x_tp, dist.group.WORLD)
    x_one = logits.clone().requires_grad_()
    lp_one, ent_one = run(x_one, None)
    torch.testing.assert_close(lp_tp, lp_one, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(ent_tp, ent_one, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(x_tp.grad, x_one.grad[..., shard], rtol=1e-12, atol=1e-12)
    reference = torch.log_softmax(logits / 0.8, -1)
    torch.testing.assert_close(
        lp_tp, reference.gather(-1, targets[..., None]).squeeze(-1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(ent_tp, -(reference.exp() * reference).sum(-1), rtol=1e-12, atol=1e-12)


def check_against_megatron_cross_entropy(rank: int, world: int) -> None:
    """Megatron's own TP cross-entropy (parallel_state's TP group) gives -log p of the same targets."""
    from megatron.core import parallel_state, tensor_parallel

    g = torch.Generator().manual_seed(11)
    vocab = 128
    logits = torch.randn(5, 3, vocab, generator=g) * 4
    targets = torch.randint(0, vocab, (5, 3), generator=g)
    shard = logits[..., rank * vocab // world : (rank + 1) * vocab // world].contiguous()
    ours = vocab_parallel_logprobs(shard, targets, tp_group=parallel_state.get_tensor_model_parallel_group())
    megatron_nll = tensor_parallel.vocab_parallel_cross_entropy(shard.clone(), targets)
    torch.testing.assert_close(ours, -megatron_nll, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    from megatron_m2po import platform

    torch.set_num_threads(1)
    platform.init_distributed(tensor_parallel=2)  # gloo on CPU; Megatron's parallel_state with TP=2
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc-per-node 2"
    check_global_m2(rank, world)
    check_vocab_parallel(rank, world)
    check_against_megatron_cross_entropy(rank, world)
    dist.barrier()
    platform.destroy_distributed()
    if rank == 0:
        print("algorithms_parallel OK", os.getpid())
