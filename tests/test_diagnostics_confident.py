"""loss/confident_fraction and loss/m2_before_unconfident: how much of the trust-region M2
mean is diluted by tokens the behaviour policy was near-certain of (mu > 0.99)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from megatron_m2po.algorithms import get_loss


def metrics_of(name: str, behavior_p: list[float], log_ratio: list[float], advantage: float = 1.0):
    blp = torch.tensor([[math.log(p) for p in behavior_p]], dtype=torch.float64)
    lp = blp + torch.tensor([log_ratio], dtype=torch.float64)
    adv = torch.full_like(lp, advantage)
    _, metrics = get_loss(name)(lp, blp, adv, torch.ones_like(lp, dtype=torch.bool))
    return metrics


def test_near_certain_tokens_dilute_the_trust_region_mean():
    """Three `\\boxed{`-like tokens (mu = 0.999, small drift) and one answer digit (mu = 0.5, log r = 0.5),
    all in T (A > 0, r > 1): the mean over T is (0.25 + 3e-4) / 4 = 0.063; over the unsure token, 0.25.
    A token outside T (r < 1 with A > 0) counts in neither."""
    m = metrics_of("grpo_noclip", [0.999, 0.999, 0.999, 0.5, 0.3], [0.01, 0.01, 0.01, 0.5, -0.7])
    assert m["loss/trust_region_fraction"] == 0.8
    assert m["loss/confident_fraction"] == 0.75
    assert m["loss/m2_before"] == pytest.approx((0.25 + 3e-4) / 4)
    assert m["loss/m2_before_unconfident"] == pytest.approx(0.25)


@given(
    st.lists(st.tuples(st.floats(0.01, 0.9999), st.floats(0.01, 1)), min_size=1, max_size=12),
    st.sampled_from(["m2po", "grpo", "on_policy"]),
)
@example([(0.99, 0.3)], "grpo")  # mu exactly 0.99 is not "confident" (the threshold is strict)
@example([(0.995, 0.3)], "m2po")
def test_the_unconfident_mean_is_over_trust_region_tokens_with_mu_at_most_099(tokens, name):
    p, lr = zip(*tokens)
    m = metrics_of(name, list(p), list(lr))
    # advantages are all +1 and every r > 1, so the trust region is every token
    n_trust = round(m["loss/trust_region_fraction"] * len(tokens))
    assert n_trust == len(tokens)
    unsure = [r * r for q, r in tokens if math.log(q) <= math.log(0.99)]
    assert m["loss/confident_fraction"] == pytest.approx(1 - len(unsure) / len(tokens))
    expected = sum(unsure) / len(unsure) if unsure else 0.0
    assert m["loss/m2_before_unconfident"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
