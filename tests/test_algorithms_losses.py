"""Every loss against a float64 reimplementation of its formula written here, values and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from algorithm_refs import algorithm1, released_m2po_clip_loss, released_trust_region
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from megatron_m2po.algorithms import LOSSES, get_loss

torch.set_num_threads(1)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@st.composite
def batches(draw, min_tokens: int = 0):
    """[B, T] float64 log-probs, behaviour log-probs, per-sequence advantages, response mask."""
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 7))
    floats = st.floats(-1.5, 1.5, allow_nan=False, allow_infinity=False)
    lp = np.array(draw(st.lists(st.floats(-6, 0), min_size=b * t, max_size=b * t))).reshape(b, t)
    shift = np.array(draw(st.lists(floats, min_size=b * t, max_size=b * t))).reshape(b, t)
    adv = np.array(draw(st.lists(st.sampled_from([0.0, 1.0, -1.0]) | floats, min_size=b, max_size=b)))
    mask = np.array(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    assume(mask.sum() >= min_tokens)
    return (
        torch.tensor(lp),
        torch.tensor(lp - shift),
        torch.tensor(adv)[:, None].expand(b, t).contiguous(),
        torch.tensor(mask),
    )


def _tiny_m2_edge():
    """Two trust-region tokens, M2 = 1 and 6.0e-21, budget 0.04 (found by hypothesis): the released tau solve
    stops at s_{k-1} < 1e-12, where its sqrt(s_{k-1} - 1e-12) is complex; both sides take tau = 0."""
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    shift = torch.tensor([[1.0, 7.75e-11]], dtype=torch.float64)
    return lp, lp - shift, torch.ones_like(lp), torch.ones_like(lp, dtype=torch.bool)


def token_mean(per_token, mask):
    m = mask.double()
    return (per_token * m).sum() / m.sum().clamp(min=1)


def seq_mean(per_seq, mask):
    """Mean over sequences that have at least one response token."""
    has = mask.any(-1).double()
    return (per_seq * has).sum() / has.sum().clamp(min=1)


def reference(name, lp, blp, adv, mask, hp, prox=None):
    """Each loss's formula, directly, in float64 autograd on lp (a leaf)."""
    r = torch.exp(lp - blp)
    eps = hp.get("clip_eps", 0.2)
    eps_high = hp.get("clip_eps_high") or eps
    if name == "grpo":
        lt = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - eps, 1 + eps_high))
        if hp.get("dual_clip"):
            lt = torch.where(adv < 0, torch.minimum(lt, -adv * hp["dual_clip"]), lt)
        return token_mean(lt, mask)
    if name == "grpo_noclip":
        return token_mean(-adv * r, mask)
    if name == "on_policy":
        return token_mean(-adv * torch.exp(lp - lp.detach()), mask)
    if name == "tis":
        return token_mean(-torch.clamp(r, max=hp.get("tis_ratio_cap", 2.0)).detach() * adv * lp, mask)
    if name == "decoupled_ppo":
        w = torch.clamp(torch.exp(prox - blp), max=2.0)
        rp = torch.exp(lp - prox)
        return token_mean(w * torch.maximum(-adv * rp, -adv * torch.clamp(rp, 1 - eps, 1 + eps_high)), mask)
    if name == "gspo":
        m = mask.double()
        s = torch.exp(((lp - blp) * m).sum(-1) / m.sum(-1).clamp(min=1))  # sequence ratio, with gradient
        a = adv[:, 0]
        per_seq = torch.maximum(-a * s, -a * torch.clamp(s, 1 - 3e-4, 1 + 4e-4))
        return seq_mean(per_seq, mask)
    if name == "cispo":
        return token_mean(-torch.clamp(r, 0.0, 1.28).detach() * adv * lp, mask)
    if name == "topr":
        m = mask.double()
        seq_ratio = torch.exp(((lp - blp) * m).sum(-1, keepdim=True)).detach()
        w = torch.where(adv < 0, torch.clamp(seq_ratio, max=1.0), torch.ones_like(seq_ratio))
        return token_mean(-w * adv * lp, mask)
    if name == "m2po":
        log_ratio = (lp - blp).detach()
        trust = released_trust_region(log_ratio, adv[:, 0], mask)
        m2 = log_ratio.square().flatten().tolist()
        keep = torch.tensor(algorithm1(m2, trust.flatten().tolist(), 0.04)).view_as(lp)
        return token_mean(torch.where(keep, -adv * r, torch.zeros_like(r)), mask)
    if name == "m2po_clip":
        return released_m2po_clip_loss(blp, lp, adv, mask, 0.04)[0]
    raise AssertionError(name)


def no_near_ties(lp, blp, adv, mask, tau=0.04):
    """Inputs where rounding M2 to 2^-24 cannot change Algorithm 1's decisions (see m2po_mask docstring)."""
    log_ratio = lp - blp
    v = sorted(log_ratio.square()[released_trust_region(log_ratio, adv[:, 0], mask)].tolist())
    gaps_ok = all(b - a > 1e-6 for a, b in zip(v, v[1:]))
    means_ok = all(abs(sum(v[:k]) / k - tau) > 1e-6 for k in range(1, len(v) + 1))
    return gaps_ok and means_ok


def run(loss, lp, blp, adv, mask, **kw):
    x = lp.clone().requires_grad_(True)
    value, metrics = loss(x, blp, adv, mask, **kw)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad, metrics


@pytest.mark.parametrize("name", sorted(LOSSES))
@SETTINGS
@given(data=batches())
@example(data=_tiny_m2_edge())
def test_loss_matches_float64_reference(name, data):
    lp, blp, adv, mask = data
    if name == "m2po":
        assume(no_near_ties(lp, blp, adv, mask))
    kw, prox = {}, None
    if name == "decoupled_ppo":
        prox = (lp + blp) / 2
        kw["proximal_logprobs"] = prox
    value, grad, metrics = run(get_loss(name), lp, blp, adv, mask, **kw)
    x = lp.clone().requires_grad_(True)
    ref = reference(name, x, blp, adv, mask, {}, prox=prox)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert value.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert metrics["loss/num_tokens"] == mask.sum().item()


@SETTINGS
@given(data=batches(), clip_eps_high=st.sampled_from([None, 0.28]), dual_clip=st.sampled_from([None, 3.0]))
def test_grpo_clip_higher_and_dual_clip(data, clip_eps_high, dual_clip):
    lp, blp, adv, mask = data
    hp = {"clip_eps_high": clip_eps_high, "dual_clip": dual_clip}
    value, grad, _ = run(get_loss("grpo", **hp), lp, blp, adv, mask)
    x = lp.clone().requires_grad_(True)
    ref = reference("grpo", x, blp, adv, mask, hp)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert value.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(data=batches(min_tokens=1), mode=st.sampled_from(["seq-mean-token-mean", "seq-mean-token-sum"]))
def test_sequence_aggregations(data, mode):
    lp, blp, adv, mask = data
    value, grad, _ = run(get_loss("grpo_noclip", aggregation=mode), lp, blp, adv, mask)
    x = lp.clone().requires_grad_(True)
    m = mask.double()
    seq_sum = (-adv * torch.exp(x - blp) * m).sum(-1)
    per_seq = seq_sum / m.sum(-1).clamp(min=1) if mode == "seq-mean-token-mean" else seq_sum
    ref = seq_mean(per_seq, mask)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert value.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(data=batches(), cap=st.sampled_from([1.5, 2.0]))
def test_tis_factor_on_engine_mismatch(data, cap):
    """behavior = trainer-recomputed, engine_logprobs = the engine's: each token weighted min(mu_tr / mu_eng, cap)."""
    lp, blp, adv, mask = data
    engine = blp + torch.linspace(-0.8, 0.8, blp.numel(), dtype=blp.dtype).view_as(blp)
    value, grad, metrics = run(
        get_loss("grpo", corrections=["token_tis"], behavior_logprobs="trainer", engine_mismatch_tis_cap=cap),
        lp,
        blp,
        adv,
        mask,
        engine_logprobs=engine,
    )
    x = lp.clone().requires_grad_(True)
    r = torch.exp(x - blp)
    w = torch.clamp(torch.exp(blp - engine), max=cap)
    ref = token_mean(w * torch.maximum(-adv * r, -adv * torch.clamp(r, 0.8, 1.2)), mask)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert value.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert "loss/correction_token_tis_weight_mean" in metrics


@pytest.mark.parametrize("name", ["grpo", "m2po"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_normalizer_sums_micro_batches_to_the_global_mean(name, mode):
    """loss = local_sum / normalizer: summing micro-batch losses (and grads) gives the whole batch's mean."""
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(8, 12, generator=g, dtype=torch.float64) * 3
    blp = lp + torch.randn(8, 12, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(8, 1, generator=g, dtype=torch.float64).expand(8, 12).contiguous()
    mask = torch.rand(8, 12, generator=g) > 0.3
    loss = get_loss(name, aggregation=mode)
    m2_threshold = None
    if name == "m2po":
        from megatron_m2po.algorithms import compute_m2_threshold

        m2_threshold = compute_m2_threshold(lp, blp, adv, mask, m2_budget=0.04)
    whole, whole_grad, _ = run(loss, lp, blp, adv, mask, m2_threshold=m2_threshold)
    norm = mask.sum().item() if mode == "token-mean" else mask.any(-1).sum().item()
    x = lp.clone().requires_grad_(True)
    parts = [
        loss(
            x[i : i + 2],
            blp[i : i + 2],
            adv[i : i + 2],
            mask[i : i + 2],
            normalizer=norm,
            m2_threshold=m2_threshold,
        )[0]
        for i in range(0, 8, 2)
    ]
    total = torch.stack(parts).sum()
    (grad,) = torch.autograd.grad(total, x)
    assert total.item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_on_policy_value_is_minus_mean_advantage_and_metrics_are_complete():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    blp = lp - 0.3
    adv = torch.full_like(lp, 2.0)
    mask = torch.tensor([[True, True, False]])
    staleness = torch.tensor([[3, 5, 99]])
    value, grad, metrics = run(get_loss("on_policy"), lp, blp, adv, mask, staleness=staleness)
    assert value.item() == pytest.approx(-2.0)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0, 0.0]], dtype=torch.float64))
    assert metrics["loss/staleness_mean"] == 4.0 and metrics["loss/staleness_max"] == 5.0
    assert metrics["loss/kl_k3"] == pytest.approx(math.exp(0.3) - 1 - 0.3)
    assert metrics["loss/ratio_p50"] == pytest.approx(math.exp(0.3))
    for key in (
        "m2_before",
        "m2_after",
        "masked_fraction",
        "clip_fraction",
        "ratio_p05",
        "ratio_p95",
        "num_tokens",
    ):
        assert f"loss/{key}" in metrics


@SETTINGS
@given(data=batches())
def test_fresh_data_makes_the_sweep_losses_one_gradient(data):
    """At s = 0 (behaviour = current policy) every loss of the staleness sweep is the on-policy
    gradient, so the sweep runs s = 0 once, as `on_policy`."""
    lp, _, adv, mask = data
    value, grad, _ = run(get_loss("on_policy"), lp, lp, adv, mask)
    for name in ("grpo", "grpo_noclip", "m2po", "m2po_clip"):
        other_value, other_grad, metrics = run(get_loss(name), lp, lp, adv, mask)
        torch.testing.assert_close(other_value, value, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(other_grad, grad, rtol=1e-12, atol=1e-15)
        assert metrics["loss/masked_fraction"] == 0.0 and metrics["loss/clip_fraction"] == 0.0


def test_m2po_diagnostics_report_the_mask():
    """Two trust-region tokens, M2 = 0.01 and 0.25: mean 0.13 > 0.04, so the 0.25 token is masked."""
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    blp = lp - torch.tensor([[0.1, 0.5, -0.2, 0.0]], dtype=torch.float64)
    adv = torch.ones_like(lp)
    mask = torch.ones_like(lp, dtype=torch.bool)
    value, grad, metrics = run(get_loss("m2po"), lp, blp, adv, mask)
    assert metrics["loss/masked_fraction"] == 0.25
    assert metrics["loss/m2_before"] == pytest.approx(0.13)
    assert metrics["loss/m2_after"] == pytest.approx(0.01)
    assert grad[0, 1] == 0 and grad[0, 0] != 0 and grad[0, 2] != 0
    _, _, clip_metrics = run(get_loss("m2po_clip"), lp, blp, adv, mask)
    assert clip_metrics["loss/clip_fraction"] > 0 and clip_metrics["loss/m2po_tau"] >= 0


# ---------------------------------------------------------------------------------------------- bad input


def make(shape=(2, 3)):
    lp = -torch.rand(shape, dtype=torch.float64)
    return lp, lp - 0.1, torch.ones(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.bool)


def test_mismatched_shapes_name_the_tensor():
    lp, blp, adv, mask = make()
    with pytest.raises(ValueError, match="behavior_logprobs has shape"):
        get_loss("m2po")(lp, blp[:, :2], adv, mask)
    with pytest.raises(ValueError, match="staleness has shape"):
        get_loss("grpo")(lp, blp, adv, mask, staleness=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\[batch, response_len\]"):
        get_loss("grpo")(lp[0], blp[0], adv[0], mask[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logprobs_raise_with_position(bad):
    lp, blp, adv, mask = make()
    lp[1, 2] = bad
    with pytest.raises(ValueError, match=r"logprobs has 1 non-finite values .* first at \(1, 2\)"):
        get_loss("m2po")(lp, blp, adv, mask)
    lp, blp, adv, mask = make()
    blp[0, 1] = bad
    with pytest.raises(ValueError, match=r"behavior_logprobs has 1 non-finite"):
        get_loss("m2po")(lp, blp, adv, mask)


def test_nonfinite_behavior_logprobs_masked_and_counted_when_asked():
    lp, blp, adv, mask = make((2, 4))
    blp[0, 1] = float("nan")
    loss = get_loss("m2po", nonfinite="mask")
    value, grad, metrics = run(loss, lp, blp, adv, mask)
    assert metrics["loss/nonfinite_tokens"] == 1 and metrics["loss/num_tokens"] == 7
    mask_without = mask.clone()
    mask_without[0, 1] = False
    clean_blp = blp.nan_to_num(0.0)
    ref_value, ref_grad, _ = run(loss, lp, clean_blp, adv, mask_without)
    assert value.item() == ref_value.item()
    torch.testing.assert_close(grad, ref_grad)
    lp[1, 1] = float("nan")  # the trainer's own log-probs: always an error
    with pytest.raises(ValueError, match="logprobs has 1 non-finite"):
        loss(lp, clean_blp, adv, mask)


def test_garbage_outside_the_response_mask_is_ignored():
    lp, blp, adv, mask = make((2, 4))
    mask[:, 3] = False
    dirty = [t.clone() for t in (lp, blp, adv)]
    for t in dirty:
        t[:, 3] = float("nan")
    for name in LOSSES:
        kw = {"proximal_logprobs": lp} if name == "decoupled_ppo" else {}
        value, grad, metrics = run(get_loss(name), *dirty, mask, **kw)
        assert math.isfinite(value.item()) and torch.isfinite(grad).all(), name
        assert all(math.isfinite(v) for v in metrics.values()), name


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="unknown loss 'm3po'"):
        get_loss("m3po")
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['clip_eps'\]"):
        get_loss("m2po", clip_eps=0.2)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        get_loss("grpo", aggregation="mean")
    with pytest.raises(ValueError, match="m2_budget must be a positive"):
        get_loss("m2po", m2_budget=0)
    with pytest.raises(ValueError, match="m2_scope must be"):
        get_loss("m2po", m2_scope="world")
    lp, blp, adv, mask = make()
    with pytest.raises(ValueError, match=r"corrections \['token_tis'\] .* need engine_logprobs"):
        get_loss("m2po", corrections=["token_tis"], behavior_logprobs="trainer")(lp, blp, adv, mask)
    with pytest.raises(ValueError, match="pass proximal_logprobs"):
        get_loss("decoupled_ppo")(lp, blp, adv, mask)
    with pytest.raises(ValueError, match="m2_scope='per_microbatch'"):
        get_loss("m2po", m2_scope="per_microbatch")(lp, blp, adv, mask, m2_threshold=0.1)
