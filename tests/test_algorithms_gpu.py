"""On CUDA: every loss and the vocab-parallel log-probs give the CPU results (device placement, no host copies)."""

from __future__ import annotations

import pytest
import torch

from megatron_m2po.algorithms import LOSSES, compute_m2_threshold, get_loss, vocab_parallel_logprobs


def batch(device):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(16, 64, generator=g) * 3
    blp = lp - torch.randn(16, 64, generator=g) * 0.3
    adv = torch.randn(16, 1, generator=g).expand(16, 64).contiguous()
    mask = torch.rand(16, 64, generator=g) > 0.2
    staleness = torch.randint(0, 8, (16, 64), generator=g)
    return [t.to(device) for t in (lp, blp, adv, mask, staleness)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_on_cuda_match_cpu(name):
    results = {}
    for device in ("cpu", "cuda"):
        lp, blp, adv, mask, staleness = batch(device)
        kw = {"proximal_logprobs": (lp + blp) / 2} if name == "decoupled_ppo" else {}
        x = lp.clone().requires_grad_()
        value, metrics = get_loss(name)(x, blp, adv, mask, staleness=staleness, **kw)
        value.backward()
        results[device] = (value.item(), x.grad.cpu(), metrics)
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-4, atol=1e-6)
    assert results["cuda"][2]["loss/num_tokens"] == results["cpu"][2]["loss/num_tokens"]


@pytest.mark.gpu
def test_m2_threshold_and_logprobs_on_cuda():
    cpu, cuda = batch("cpu"), batch("cuda")
    assert compute_m2_threshold(*cpu[:4], m2_budget=0.04) == compute_m2_threshold(*cuda[:4], m2_budget=0.04)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 33, 5000, generator=g) * 3
    targets = torch.randint(0, 5000, (4, 33), generator=g)
    x = logits.cuda().bfloat16().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets.cuda(), with_entropy=True, chunk_size=16)
    (lp.sum() + ent.sum()).backward()
    ref = torch.log_softmax(logits.bfloat16().float(), -1)
    torch.testing.assert_close(lp.cpu(), ref.gather(-1, targets[..., None]).squeeze(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.cpu(), -(ref.exp() * ref).sum(-1), rtol=1e-5, atol=1e-4)
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
