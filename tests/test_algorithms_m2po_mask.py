"""The M2PO selections: the four mask properties of the paper's Algorithm 1 (docs/algorithms.md), and the released m2po_clip solve."""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
import time

import pytest
import torch
from algorithm_refs import algorithm1, released_m2po_clip_loss, released_solve_tau, released_trust_region
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from megatron_m2po.algorithms import compute_m2_threshold, get_loss, trust_region_mask, water_filling_tau
from megatron_m2po.algorithms.m2po_mask import M2_GRID, m2po_masked_tokens, quantized_m2

torch.set_num_threads(1)
TAU = 0.04
SLACK = M2_GRID  # M2 is rounded to the 2^-24 grid before the budget test
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])

log_ratios = st.floats(-1.2, 1.2, allow_nan=False) | st.sampled_from([0.0, 0.1, -0.1, 0.3, -0.3, 0.19, 0.21])


@st.composite
def tokens(draw, max_len: int = 24):
    """One row of tokens: log-ratios, advantages (one per token, signs mixed), a response mask."""
    n = draw(st.integers(0, max_len))
    lr = torch.tensor(draw(st.lists(log_ratios, min_size=n, max_size=n)), dtype=torch.float64)
    adv = torch.tensor(
        draw(st.lists(st.sampled_from([1.0, -1.0, 0.0, 0.5]), min_size=n, max_size=n)), dtype=torch.float64
    )
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    blp = torch.full((1, n), -2.0, dtype=torch.float64)
    return blp + lr[None], blp, adv[None], mask[None]


def selection(lp, blp, adv, mask, tau=TAU):
    """(masked, trust region, M2) from the package, via the global threshold."""
    theta = compute_m2_threshold(lp, blp, adv, mask, m2_budget=tau)
    log_ratio = lp - blp
    trust = trust_region_mask(log_ratio, adv, mask)
    masked = m2po_masked_tokens(quantized_m2(log_ratio), trust, theta)
    return masked, trust, log_ratio.square(), theta


def mean_or_zero(values):
    return sum(values) / len(values) if values else 0.0


@SETTINGS
@given(data=tokens())
def test_property_1_no_op_below_the_budget_equals_plain_importance_sampling(data):
    lp, blp, adv, mask = data
    masked, trust, m2, theta = selection(lp, blp, adv, mask)
    if mean_or_zero(m2[trust].tolist()) <= TAU - SLACK:
        assert math.isinf(theta) and not masked.any()
        x1, x2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        a, _ = get_loss("m2po")(x1, blp, adv, mask)
        b, _ = get_loss("grpo_noclip")(x2, blp, adv, mask)
        a.backward(), b.backward()
        assert a.item() == b.item() and torch.equal(x1.grad, x2.grad)


@SETTINGS
@given(data=tokens())
def test_properties_2_to_4_bound_minimality_and_only_the_largest(data):
    lp, blp, adv, mask = data
    masked, trust, m2, _ = selection(lp, blp, adv, mask)
    kept = m2[trust & ~masked].tolist()
    removed = m2[masked].tolist()
    # (2) the bound holds after masking
    assert mean_or_zero(kept) <= TAU + SLACK
    # (4) only trust-region tokens, and only the largest ones
    assert not (masked & ~trust).any()
    if removed and kept:
        assert min(removed) > max(kept)
    # (3) minimal: giving back the smallest masked value (all its tied copies) breaks the bound
    if removed:
        smallest = min(removed)
        back = [v for v in removed if abs(v - smallest) <= SLACK]
        assert mean_or_zero(kept + back) > TAU - SLACK


def no_near_ties(values, tau=TAU):
    v = sorted(values)
    return all(b - a > 1e-6 for a, b in zip(v, v[1:])) and all(
        abs(sum(v[:k]) / k - tau) > 1e-6 for k in range(1, len(v) + 1)
    )


@SETTINGS
@given(data=tokens(max_len=16))
def test_equals_a_literal_transcription_of_algorithm_1(data):
    lp, blp, adv, mask = data
    masked, trust, m2, _ = selection(lp, blp, adv, mask)
    keep = torch.tensor(
        algorithm1(m2.flatten().tolist(), trust.flatten().tolist(), TAU), dtype=torch.bool
    ).view_as(mask)
    if no_near_ties(m2[trust].tolist()):
        assert torch.equal(~keep, masked)
    else:
        # (near-)ties at the cut: the two may differ, but only in tokens whose M2 is the cut value
        differ = masked ^ ~keep
        if differ.any():
            cut = m2[masked | ~keep].min()
            assert (m2[differ] - cut).abs().max() <= 1e-6


def test_ties_mask_every_copy():
    """M2 = 0.01, 0.06, 0.06: mean 0.043 > 0.04; Algorithm 1 drops one 0.06 (then (0.01 + 0.06) / 2 = 0.035),
    the threshold drops both copies: a documented difference, only at ties."""
    lr = torch.tensor([[0.1, math.sqrt(0.06), math.sqrt(0.06)]], dtype=torch.float64)
    blp = torch.zeros_like(lr)
    adv, mask = torch.ones_like(lr), torch.ones_like(lr, dtype=torch.bool)
    masked, *_ = selection(lr, blp, adv, mask)
    keep = algorithm1(lr.square().flatten().tolist(), [True] * 3, TAU)
    assert keep[0] and sum(keep) == 2  # one copy of 0.06 kept
    assert masked.tolist() == [[False, True, True]]  # both copies of the tied value go


@st.composite
def trust_values(draw):
    """delta^2 of trust-region tokens, heavy-tailed like stale data: mostly tiny, a few large."""
    small = draw(st.lists(st.floats(1e-8, 0.05), min_size=0, max_size=30))
    large = draw(st.lists(st.floats(0.05, 4.0), min_size=0, max_size=6))
    return torch.tensor(small + large, dtype=torch.float64)[torch.randperm(len(small) + len(large))]


@settings(max_examples=200, deadline=None)
@given(values=trust_values(), budget=st.sampled_from([0.04, 0.01, 0.1]))
@example(values=torch.tensor([1.0, 6.0e-21], dtype=torch.float64), budget=0.04)  # s_{k-1} < 1e-12: tau = 0
def test_water_filling_tau_identical_to_the_released_loop(values, budget):
    solved = water_filling_tau(values, budget)
    n = values.numel()
    if n == 0 or values.sum().item() / n <= budget + 1e-12:
        assert solved.tau is None
        return
    tau, m2_after = released_solve_tau(torch.sort(values).values, budget * float(n))
    assert solved.tau == tau  # identical, not approximately equal
    assert solved.m2_after == m2_after


@st.composite
def clip_batches(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    lr = torch.tensor(
        draw(st.lists(st.floats(-1.5, 1.5), min_size=b * t, max_size=b * t)), dtype=torch.float64
    )
    adv = torch.tensor(
        draw(st.lists(st.sampled_from([1.0, -1.0, 0.0, 0.7, -2.0]), min_size=b, max_size=b)),
        dtype=torch.float64,
    )
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).view(b, t)
    old = torch.full((b, t), -1.5, dtype=torch.float64)
    return old + lr.view(b, t), old, adv[:, None].expand(b, t).contiguous(), mask


# Found by hypothesis: trust-region M2 of 1 and 6.0e-21, so the released solve's tau^2 = s_{k-1} - 1e-12 < 0
_OLD = torch.full((1, 2), -1.5, dtype=torch.float64)
TINY_M2_EDGE = (
    _OLD + torch.tensor([[1.0, 7.75e-11]], dtype=torch.float64),
    _OLD,
    torch.ones_like(_OLD),
    torch.ones(1, 2, dtype=torch.bool),
)


@settings(max_examples=80, deadline=None)
@given(data=clip_batches(), low=st.sampled_from([None, 0.3]), high=st.sampled_from([None, 0.5]))
@example(data=TINY_M2_EDGE, low=None, high=None)
def test_m2po_clip_equals_the_released_code_step_by_step(data, low, high):
    lp, old, adv, mask = data
    x = lp.clone().requires_grad_()
    value, metrics = get_loss("m2po_clip", miniclip_low=low, miniclip_high=high)(x, old, adv, mask)
    value.backward()
    xr = lp.clone().requires_grad_()
    try:
        ref, clipfrac, (lo, hi), m2_after = released_m2po_clip_loss(old, xr, adv, mask, 0.04, low, high)
    except TypeError as err:  # the released code takes sqrt(s - 1e-12) < 0 and fails; we use tau = 0
        assert "complex" in str(err) and metrics["loss/m2po_tau"] == 0.0
        return
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-15)
    assert metrics["loss/clip_fraction"] == pytest.approx(clipfrac.item())
    assert (metrics["loss/clip_low"], metrics["loss/clip_high"]) == (lo, hi)
    assert metrics["loss/m2_capped"] == pytest.approx(m2_after)


@settings(max_examples=60, deadline=None)
@given(data=clip_batches())
@example(data=TINY_M2_EDGE)
def test_m2po_clip_masks_at_least_what_m2po_masks(data):
    """Both drop a suffix of the sorted trust-region M2; the capped-mean rule stops later (docs/algorithms.md, "m2po vs m2po_clip")."""
    lp, old, adv, mask = data
    trust_m2 = (lp - old).square()[released_trust_region(lp - old, adv[:, 0], mask)].tolist()
    assume(no_near_ties(trust_m2))
    grads = {}
    for name in ("m2po", "m2po_clip"):
        x = lp.clone().requires_grad_()
        get_loss(name)(x, old, adv, mask)[0].backward()
        grads[name] = x.grad
    dropped_m2po = mask & (adv != 0) & (grads["m2po"] == 0)
    dropped_clip = mask & (adv != 0) & (grads["m2po_clip"] == 0)
    assert not (dropped_m2po & ~dropped_clip).any()


def test_water_filling_solve_has_no_python_loop_and_scales():
    tree = ast.parse(textwrap.dedent(inspect.getsource(water_filling_tau)))
    loops = [node for node in ast.walk(tree) if isinstance(node, (ast.For, ast.While, ast.comprehension))]
    assert not loops, "water_filling_tau must stay vectorised"
    values = torch.rand(1_000_000, dtype=torch.float64) ** 4
    start = time.perf_counter()
    torch.sort(values)
    one_sort = time.perf_counter() - start
    start = time.perf_counter()
    solved = water_filling_tau(values, 0.04)
    # one sort + cumsum + argmax: a few sorts' time, measured against a sort on this (possibly busy) machine
    assert time.perf_counter() - start < 10 * one_sort + 0.2 and solved.tau is not None


def test_global_threshold_is_independent_of_the_micro_batch_split():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(16, 32, generator=g, dtype=torch.float64) * 4
    blp = lp + torch.randn(16, 32, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(16, 1, generator=g, dtype=torch.float64).expand(16, 32).contiguous()
    mask = torch.rand(16, 32, generator=g) > 0.2
    whole = compute_m2_threshold(lp, blp, adv, mask, m2_budget=0.04)
    chunks = [slice(0, 3), slice(3, 4), slice(4, 11), slice(11, 16)]
    split = compute_m2_threshold(*[[t[c] for c in chunks] for t in (lp, blp, adv, mask)], m2_budget=0.04)
    assert whole == split and not math.isinf(whole)
    with pytest.raises(ValueError, match="same number of micro-batches"):
        compute_m2_threshold([lp], [blp, blp], [adv], [mask], m2_budget=0.04)
    with pytest.raises(ValueError, match="micro-batch 0"):
        compute_m2_threshold(lp, blp[:, :3], adv, mask, m2_budget=0.04)


def test_threshold_uses_the_losss_arithmetic_for_mixed_dtypes():
    """fp32 trainer log-probs with fp64 behaviour log-probs: the pre-pass threshold reproduces the loss's mask."""
    g = torch.Generator().manual_seed(5)
    lp = (-torch.rand(8, 50, generator=g, dtype=torch.float64) * 3).float()
    blp = lp.double() - torch.randn(8, 50, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(8, 1, generator=g).expand(8, 50).contiguous()
    mask = torch.ones(8, 50, dtype=torch.bool)
    theta = compute_m2_threshold(lp, blp, adv, mask, m2_budget=0.04)
    _, given = get_loss("m2po")(lp, blp, adv, mask, m2_threshold=theta)
    _, own = get_loss("m2po", m2_scope="per_microbatch")(lp, blp, adv, mask)
    assert given["loss/masked_fraction"] == own["loss/masked_fraction"] > 0


@settings(max_examples=60, deadline=None)
@given(data=clip_batches(), cuts=st.lists(st.integers(0, 4), max_size=3))
def test_global_threshold_same_for_any_split(data, cuts):
    """Any partition of the rows into micro-batches (empty ones included) gives the same threshold."""
    lp, old, adv, mask = data
    bounds = sorted({0, lp.shape[0], *[min(c, lp.shape[0]) for c in cuts]})
    parts = [slice(a, b) for a, b in zip(bounds, bounds[1:])] + [slice(0, 0)]
    whole = compute_m2_threshold(lp, old, adv, mask, m2_budget=0.04)
    split = compute_m2_threshold(*[[t[p] for p in parts] for t in (lp, old, adv, mask)], m2_budget=0.04)
    assert whole == split
