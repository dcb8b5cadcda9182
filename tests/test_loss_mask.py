"""Multi-turn samples train on the model's tokens only: the loss mask reaches `response_mask` through the rows,
the padded and packed micro-batches and the token-budget plan, and every loss and diagnostic over a masked
trajectory equals the single-turn path's over the model's tokens alone; an all-ones mask is today's path bit
for bit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from megatron_m2po.algorithms import LOSSES, compute_m2_threshold, get_loss
from megatron_m2po.trainer.batching import (
    TOKEN_FIELDS,
    groups_to_rows,
    make_microbatches,
    plan_microbatches,
    rows_to_microbatch,
)
from megatron_m2po.types import Group, Sample

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def _sample(i: int, runs: list[int], seed: int, *, prompt_len: int = 3, all_ones: bool = False) -> Sample:
    """A trajectory of alternating model / environment runs (`runs`, model first); environment tokens hold
    log-prob 0 and the version of the token before them, as `Trajectory` writes them."""
    g = torch.Generator().manual_seed(seed)
    mask = [1 - k % 2 for k, n in enumerate(runs) for _ in range(n)]
    n = len(mask)
    logprobs = [(-3 * torch.rand(1, generator=g)).item() if m else 0.0 for m in mask]
    starts, at = [], 0
    for r in runs:
        if r:
            starts.append(at)
        at += r
    return Sample(
        prompt_id="p",
        group_index=i,
        prompt_ids=torch.randint(3, 200, (prompt_len,), generator=g).tolist(),
        response_ids=torch.randint(3, 200, (n,), generator=g).tolist(),
        behavior_logprobs=logprobs,
        versions=[4 + (k > n // 2) for k in range(n)],
        finish_reason="stop",
        loss_mask=[1] * n if all_ones else mask,
        turn_starts=starts,
    )


def _rows(samples: list[Sample], advantages: list[float]):
    group = Group("p", samples[0].prompt_ids, samples)
    return groups_to_rows([group], torch.tensor(advantages))


def test_the_mask_reaches_response_mask_padded_packed_and_in_token_budget_micro_batches():
    samples = [_sample(0, [4, 3, 2], 1), _sample(1, [2, 5, 3, 1, 2], 2), _sample(2, [6], 3)]
    rows = _rows(samples, [1.0, -1.0, 0.5])
    mb = rows_to_microbatch(rows, consumer_version=6, pad_id=0, pack=True)
    for i, s in enumerate(samples):
        p, n = len(s.prompt_ids), len(s.response_ids)
        expected = torch.zeros(mb.response_mask.shape[1])
        expected[p - 1 : p - 1 + n] = torch.tensor(s.loss_mask, dtype=torch.float32)
        assert torch.equal(mb.response_mask[i], expected)
        assert rows[i].loss_tokens == s.model_tokens == sum(s.loss_mask)
    # the packed form maps the same slots: a per-token tensor through it comes back under the same mask
    valid = mb.packed.index >= 0
    assert torch.equal(mb.packed.unpack(mb.packed.targets.float())[valid], mb.targets.float()[valid])
    assert bool((valid | (mb.response_mask == 0)).all())  # every masked-in slot has a packed position
    assert mb.num_tokens == sum(s.model_tokens for s in samples)
    # token-budget micro-batches: each carries its rows' masks, and together they count every model token
    plan = plan_microbatches([len(r.tokens) for r in rows], 1, micro_batch_size=1, max_tokens=20)
    mbs = make_microbatches(rows, plan[0], consumer_version=6, pad_id=0, pack=True)
    assert len(mbs) > 1 and sum(m.num_tokens for m in mbs) == mb.num_tokens
    for m in mbs:
        for slot, i in enumerate(m.row_index.tolist()):
            assert m.response_mask[slot].sum().item() == samples[i].model_tokens


def test_an_all_ones_mask_is_the_single_turn_path_bit_for_bit():
    multi = [_sample(i, [5, 3, 4], 10 + i, all_ones=True) for i in range(3)]
    single = [_sample(i, [5, 3, 4], 10 + i) for i in range(3)]
    for s, m in zip(single, multi):
        s.loss_mask, s.turn_starts = None, []
        assert s.response_ids == m.response_ids and s.model_tokens == m.model_tokens
    adv = [0.3, -1.0, 2.0]
    for pack in (False, True):
        a = rows_to_microbatch(_rows(multi, adv), consumer_version=5, pad_id=0, pack=pack)
        b = rows_to_microbatch(_rows(single, adv), consumer_version=5, pad_id=0, pack=pack)
        for name in (*TOKEN_FIELDS, "tokens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert [r.loss_tokens for r in _rows(multi, adv)] == [r.loss_tokens for r in _rows(single, adv)]


def _compressed(samples: list[Sample]) -> list[Sample]:
    """The same responses with the environment's tokens cut out: the single-turn layout of the model's tokens."""
    out = []
    for s in samples:
        keep = [t for t, m in enumerate(s.loss_mask) if m]
        out.append(
            Sample(
                prompt_id=s.prompt_id,
                group_index=s.group_index,
                prompt_ids=s.prompt_ids,
                response_ids=[s.response_ids[t] for t in keep],
                behavior_logprobs=[s.behavior_logprobs[t] for t in keep],
                versions=[s.versions[t] for t in keep],
                finish_reason=s.finish_reason,
            )
        )
    return out


def _per_token(mb, values: dict[int, list[float]]) -> torch.Tensor:
    """[b, L-1] float64 holding each row's values at its masked-in positions, garbage elsewhere."""
    out = torch.full(mb.response_mask.shape, 7.5, dtype=torch.float64)
    for i, vals in values.items():
        out[i, mb.response_mask[i].bool()] = torch.tensor(vals, dtype=torch.float64)
    return out


def _loss(name, mode, mb, lp, prox):
    loss = get_loss(name, aggregation=mode)
    kw = {"staleness": mb.staleness}
    if name == "decoupled_ppo":
        kw["proximal_logprobs"] = prox
    blp, adv = mb.behavior_logprobs.double(), mb.advantages.double()
    if name == "m2po":
        kw["m2_threshold"] = compute_m2_threshold(lp, blp, adv, mb.response_mask.bool(), m2_budget=0.04)
    x = lp.clone().requires_grad_(True)
    value, metrics = loss(x, blp, adv, mb.response_mask, **kw)
    (grad,) = torch.autograd.grad(value, x)
    return value.item(), grad[mb.response_mask.bool()], metrics


@settings(max_examples=12, deadline=None)
@given(
    runs=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
@example(runs=[[3, 2, 4], [1, 6, 1, 1, 2]], seed=0)
def test_every_loss_and_diagnostic_over_a_masked_trajectory_equals_the_single_turn_path(runs, seed):
    samples = [_sample(i, r, seed + i) for i, r in enumerate(runs)]
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(len(samples), generator=g).tolist()
    model_lp = {
        i: (
            torch.tensor(s.behavior_logprobs)[torch.tensor(s.loss_mask).bool()]
            + 0.3 * torch.randn(s.model_tokens, generator=g)
        ).tolist()
        for i, s in enumerate(samples)
    }
    prox_lp = {i: [v - 0.05 for v in vals] for i, vals in model_lp.items()}
    multi = rows_to_microbatch(_rows(samples, adv), consumer_version=6, pad_id=0)
    single = rows_to_microbatch(_rows(_compressed(samples), adv), consumer_version=6, pad_id=0)
    for name in sorted(LOSSES):
        for mode in AGGREGATIONS:
            a = _loss(name, mode, multi, _per_token(multi, model_lp), _per_token(multi, prox_lp))
            b = _loss(name, mode, single, _per_token(single, model_lp), _per_token(single, prox_lp))
            assert a[0] == pytest.approx(b[0], rel=1e-9, abs=1e-12), (name, mode)
            torch.testing.assert_close(a[1], b[1], rtol=1e-9, atol=1e-12)
            assert a[2].keys() == b[2].keys()
            for key, value in a[2].items():
                other = b[2][key]
                assert (math.isnan(value) and math.isnan(other)) or value == pytest.approx(
                    other, rel=1e-6, abs=1e-9
                ), (name, mode, key)
