"""Vocab-parallel log-probs and entropy against log_softmax of the full logits (TP=1 here; TP=2 in dist)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_m2po.algorithms import vocab_parallel_logprobs

torch.set_num_threads(1)


def reference(logits, targets, temperature):
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    return log_p.gather(-1, targets[..., None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    vocab=st.integers(2, 70),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    chunk=st.integers(1, 8),
    scale=st.sampled_from([1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_log_softmax_values_and_gradients(batch, seq, vocab, temperature, chunk, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    up_lp, up_h = (
        torch.randn(batch, seq, generator=g, dtype=torch.float64),
        torch.randn(batch, seq, generator=g, dtype=torch.float64),
    )

    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(
        x, targets, temperature=temperature, chunk_size=chunk, with_entropy=True
    )
    ((lp * up_lp).sum() + (ent * up_h).sum()).backward()
    xr = logits.clone().requires_grad_()
    rlp, rent = reference(xr, targets, temperature)
    ((rlp * up_lp).sum() + (rent * up_h).sum()).backward()

    assert torch.equal(x.detach(), logits), "the logits must not be modified in place"
    torch.testing.assert_close(lp, rlp, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ent, rent, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)


def test_bf16_logits_give_fp32_logprobs_and_bf16_gradients():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 6, 300, generator=g) * 4).bfloat16()
    targets = torch.randint(0, 300, (4, 6), generator=g)
    x = logits.clone().requires_grad_()
    lp = vocab_parallel_logprobs(x, targets, chunk_size=5)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    xr = logits.float().requires_grad_()
    rlp = torch.log_softmax(xr, -1).gather(-1, targets[..., None]).squeeze(-1)
    rlp.sum().backward()
    torch.testing.assert_close(lp, rlp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=1e-2, atol=1e-2)


def test_backward_keeps_no_vocab_sized_tensor_besides_the_logits():
    """What autograd saves between forward and backward: the logits themselves plus O(tokens) floats."""
    logits = torch.randn(64, 1000, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = vocab_parallel_logprobs(logits * 1.0, targets, chunk_size=16, with_entropy=True)
    others = [t for t in saved if t.numel() >= 64 * 1000]
    assert len(others) == 1, "only the logits (as the Function's input) may be vocab-sized"
    assert sum(t.numel() for t in saved if t.numel() < 64 * 1000) <= 5 * 64


def test_bad_input_is_named():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"logits \(2, 3, 10\) must be target_ids \(2, 4\)"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, 10\)"):
        vocab_parallel_logprobs(logits, torch.full((2, 3), 10))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(TypeError, match="floating point"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 10, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
