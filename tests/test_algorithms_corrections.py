"""Rollout corrections against a token-by-token reference (tests/algorithm_refs.py), their composition with the
losses (which distributions they compare) and with the M2 mask (the order: corrections first)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from algorithm_refs import algorithm1, rollout_correction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_m2po.algorithms import CurrentLogprobs, compute_m2_threshold, get_loss
from megatron_m2po.algorithms.corrections import CORRECTIONS, apply_corrections
from megatron_m2po.algorithms.m2po_mask import trust_region_mask

torch.set_num_threads(1)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
THRESHOLDS = {
    "token_tis": {"engine_mismatch_tis_cap": 1.3},
    "token_mis": {"mis_low": 0.7, "mis_high": 1.4},
    "icepop": {"icepop_low": 0.6, "icepop_high": 1.5},
    "seq_geo_mask": {"geo_mask_low": 0.8, "geo_mask_high": 1.2},
    "seq_product_mask": {"seq_mask_low": 0.5, "seq_mask_high": 2.0},
}


@st.composite
def log_rhos(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    values = draw(st.lists(st.floats(-1.2, 1.2), min_size=b * t, max_size=b * t))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    return torch.tensor(values, dtype=torch.float64).view(b, t), torch.tensor(mask).view(b, t)


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
@SETTINGS
@given(data=log_rhos(), defaults=st.booleans())
def test_each_rule_matches_its_reference(name, data, defaults):
    log_rho, mask = data
    t = {} if defaults else THRESHOLDS[name]
    keep, weight, metrics = apply_corrections((name,), t, log_rho, mask)
    ref_keep, ref_weight = rollout_correction(name, log_rho, mask, **t)
    assert torch.equal(keep, ref_keep & mask)
    if ref_weight is None:
        assert weight is None
    else:
        torch.testing.assert_close(weight[keep], ref_weight[keep], rtol=1e-12, atol=0)
    n = int(mask.sum())
    if n:
        dropped = int((mask & ~ref_keep).sum()) / n
        assert metrics[f"correction_{name}_masked_fraction"] == pytest.approx(dropped)
        assert metrics["correction_ratio_max"] == pytest.approx(float(torch.exp(log_rho[mask]).max()))
        assert metrics["correction_inverse_ratio_max"] == pytest.approx(
            float(torch.exp(-log_rho[mask]).max())
        )


def _batch(seed=0, b=4, t=6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    blp = lp - torch.randn(b, t, generator=g, dtype=torch.float64) * 0.4
    engine = blp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).contiguous()
    mask = torch.rand(b, t, generator=g) < 0.85
    return lp, blp, engine, adv, mask


@pytest.mark.parametrize("rules", [["token_tis"], ["token_mis"], ["seq_product_mask", "token_tis"]])
def test_trainer_behaviour_compares_trainer_with_engine(rules):
    """behavior_logprobs=trainer: rho = mu_trainer / mu_engine; grpo's loss on the kept tokens, times the
    weights, over the original token count."""
    lp, blp, engine, adv, mask = _batch()
    t = {k: v for r in rules for k, v in THRESHOLDS[r].items()}
    loss = get_loss("grpo", corrections=rules, behavior_logprobs="trainer", **t)
    x = lp.clone().requires_grad_(True)
    value, metrics = loss(x, blp, adv, mask, engine_logprobs=engine)
    keep, weight = mask.clone(), torch.ones_like(lp)
    for r in rules:
        k, w = rollout_correction(r, blp - engine, keep, **THRESHOLDS[r])
        keep &= k
        weight = weight if w is None else weight * w
    ratio = torch.exp(x - blp)
    per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)) * weight
    ref = (per_token * keep).sum() / mask.sum()
    assert value.item() == pytest.approx(ref.item(), rel=1e-10)
    (g,) = torch.autograd.grad(value, x)
    (ref_g,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g, ref_g)
    assert metrics["loss/num_tokens"] == int(keep.sum())


def test_engine_behaviour_compares_the_policy_before_the_update_with_the_engine():
    """behavior_logprobs=engine: rho = pi_old / mu_engine = the loss's own ratio at the update's start."""
    lp, blp, _, adv, mask = _batch(1)
    loss = get_loss("grpo_noclip", corrections=["icepop"], **THRESHOLDS["icepop"])
    value, metrics = loss(lp, blp, adv, mask)
    keep, _ = rollout_correction("icepop", lp - blp, mask, **THRESHOLDS["icepop"])
    keep &= mask
    ref = (-adv * torch.exp(lp - blp) * keep).sum() / mask.sum()
    assert value.item() == pytest.approx(ref.item(), rel=1e-10)
    assert metrics["loss/correction_icepop_masked_fraction"] == pytest.approx(
        float((mask & ~keep).sum() / mask.sum())
    )


@pytest.mark.parametrize("rule", ["token_tis", "token_mis"])
def test_weighting_rules_are_refused_where_the_ratio_already_holds_the_engine(rule):
    with pytest.raises(ValueError, match=f"'{rule}' weights the loss .* needs behavior_logprobs='trainer'"):
        get_loss("m2po", corrections=[rule])


def test_bad_correction_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown rollout correction 'tokn_tis'"):
        get_loss("m2po", corrections=["tokn_tis"])
    with pytest.raises(ValueError, match="listed twice"):
        get_loss("m2po", corrections=["icepop", "icepop"])
    with pytest.raises(ValueError, match="icepop_low=2.0 must be below icepop_high=1.5"):
        get_loss("m2po", corrections=["icepop"], icepop_low=2.0, icepop_high=1.5)
    with pytest.raises(ValueError, match="mis_high must be a positive"):
        get_loss("m2po", mis_high=-1.0)


def _m2po_reference(lp, blp, adv, keep, mask, budget):
    """Algorithm 1 on the trust-region tokens the corrections kept; the loss over the original token count."""
    log_ratio = lp - blp
    trust = trust_region_mask(log_ratio, adv, keep)
    m2 = log_ratio.square().flatten().tolist()
    kept_m2 = torch.tensor(algorithm1(m2, trust.flatten().tolist(), budget)).view_as(lp)
    return (torch.where(kept_m2 & keep, -adv * torch.exp(log_ratio), 0.0)).sum() / mask.sum(), trust


@pytest.mark.parametrize("behavior", ["engine", "trainer"])
def test_m2_budget_covers_only_the_tokens_the_corrections_kept(behavior):
    """Order: the corrections drop tokens first; the M2 mask's T and its second-moment budget are then over the
    kept tokens only. Also through the trainer's protocol (threshold before the update, from the corrected
    masks): the same loss."""
    lp, blp, engine, adv, mask = _batch(2, b=6, t=8)
    rules = ["icepop"] if behavior == "engine" else ["icepop", "token_tis"]
    t = {"icepop_low": 0.8, "icepop_high": 1.25, "engine_mismatch_tis_cap": 1.3}
    loss = get_loss("m2po", m2_budget=0.02, corrections=rules, behavior_logprobs=behavior, **t)
    kw = {"engine_logprobs": engine} if behavior == "trainer" else {}
    value, metrics = loss(lp, blp, adv, mask, **kw)
    log_rho = blp - engine if behavior == "trainer" else lp - blp
    keep, weight, _ = apply_corrections(tuple(rules), t, log_rho, mask)
    assert 0 < (mask & ~keep).sum() < mask.sum()  # the rule drops some tokens here
    if weight is None:
        ref, trust = _m2po_reference(lp, blp, adv, keep, mask, 0.02)
        assert value.item() == pytest.approx(ref.item(), rel=1e-10)
        # the budget over all tokens of T (no correction) would mask differently
        wide = trust_region_mask(lp - blp, adv, mask)
        assert not torch.equal(wide, trust)
    current = CurrentLogprobs(
        [lp], [blp], [adv], [mask], engine_logprobs=[engine] if behavior == "trainer" else None
    )
    (before,) = loss.inputs_before_update(current)
    assert before["m2_threshold"] == compute_m2_threshold(lp, blp, adv, keep, m2_budget=0.02)
    again, _ = loss(lp, blp, adv, mask, m2_threshold=before["m2_threshold"], **kw)
    assert again.item() == pytest.approx(value.item(), rel=1e-12)


def test_masks_compose_in_order_and_report_what_each_dropped():
    """A later rule sees only the tokens the earlier ones kept: its masked fraction excludes theirs."""
    rng = np.random.default_rng(0)
    log_rho = torch.tensor(rng.normal(0, 0.6, (8, 10)))
    mask = torch.ones(8, 10, dtype=torch.bool)
    t = {"icepop_low": 0.7, "icepop_high": 1.4, "seq_mask_low": 0.2, "seq_mask_high": 5.0}
    keep, _, metrics = apply_corrections(("icepop", "seq_product_mask"), t, log_rho, mask)
    first, _ = rollout_correction("icepop", log_rho, mask, **t)
    second, _ = rollout_correction("seq_product_mask", log_rho, first, **t)
    assert torch.equal(keep, first & second)
    assert metrics["correction_icepop_masked_fraction"] == pytest.approx(float((~first).sum() / 80))
    assert metrics["correction_seq_product_mask_masked_fraction"] == pytest.approx(
        float((first & ~second).sum() / 80)
    )
    assert metrics["correction_kept_fraction"] == pytest.approx(float(keep.sum() / 80))
