"""Group advantages against a per-group Python computation."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_m2po.algorithms import compute_advantages


def reference(rewards: list[float], groups: list[str], estimator: str, eps: float = 1e-6) -> list[float]:
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        if len(members) == 1:
            out.append(r)
        elif estimator == "grpo":
            out.append((r - statistics.fmean(members)) / (statistics.stdev(members) + eps))
        elif estimator == "drgrpo":
            out.append(r - statistics.fmean(members))
        else:
            others = list(members)
            others.remove(r)
            out.append(r - statistics.fmean(others))
    return out


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["p0", "p1", "p2", "p3"]), st.sampled_from([0.0, 1.0, 0.1]) | st.floats(-3, 3)
        ),
        max_size=20,
    ),
    estimator=st.sampled_from(["grpo", "drgrpo", "rloo"]),
)
def test_matches_per_group_reference(rows, estimator):
    groups = [g for g, _ in rows]
    rewards = [r for _, r in rows]
    got = compute_advantages(torch.tensor(rewards, dtype=torch.float64), groups, estimator)
    assert got.tolist() == pytest.approx(reference(rewards, groups, estimator), rel=1e-9, abs=1e-9)


def test_single_response_group_gets_its_reward_and_ties_give_zero():
    adv = compute_advantages(torch.tensor([0.7, 1.0, 1.0, 0.0]), ["solo", "a", "a", "b"])
    assert adv.tolist() == pytest.approx([0.7, 0.0, 0.0, 0.0])
    adv = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), ["g"] * 4)
    assert adv[0] > 0 and (adv[1:] < 0).all() and adv.sum().abs() < 1e-6


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="estimator must be one of"):
        compute_advantages(torch.zeros(2), ["a", "a"], "ppo")
    with pytest.raises(ValueError, match="2 rewards but 3 group_ids"):
        compute_advantages(torch.zeros(2), ["a", "a", "b"])
    with pytest.raises(ValueError, match=r"non-finite rewards at sample indices \[1\]"):
        compute_advantages(torch.tensor([0.0, float("nan")]), ["a", "a"])
