"""Outcome advantages from scalar rewards, normalised within each prompt's group of responses.

One scalar per response; the trainer broadcasts it to the response's tokens. Groups are given by any
hashable id (the prompt id), so responses of one prompt need not be adjacent.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import get_args

import torch

from megatron_m2po.choices import AdvantageEstimator

__all__ = ["ADVANTAGE_ESTIMATORS", "compute_advantages"]

ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: Sequence[Hashable],
    estimator: AdvantageEstimator = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-response advantages A_i from rewards R_i and their group ids.

    grpo:   A_i = (R_i - mean_g R) / (std_g R + eps), std with Bessel's correction (torch.std, as verl and
            the released M2PO code).
    drgrpo: A_i = R_i - mean_g R (Dr. GRPO: no std division, which biases towards easy/hard prompts).
    rloo:   A_i = R_i - mean of the other responses of the group = n / (n - 1) * (R_i - mean_g R).
    A group with a single response has no baseline: A_i = R_i for every estimator (docs/algorithms.md, "Advantages").
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"compute_advantages: estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}"
        )
    if rewards.dim() != 1:
        raise ValueError(
            f"compute_advantages: rewards must be 1-D [n_samples], got shape {tuple(rewards.shape)}"
        )
    if len(group_ids) != rewards.numel():
        raise ValueError(f"compute_advantages: {rewards.numel()} rewards but {len(group_ids)} group_ids")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"compute_advantages: non-finite rewards at sample indices {bad[:10]}")
    if rewards.numel() == 0:
        return rewards.clone()

    index_of: dict[Hashable, int] = {}
    group = torch.tensor([index_of.setdefault(g, len(index_of)) for g in group_ids], device=rewards.device)
    r = rewards.double()
    n_groups = len(index_of)
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(
        0, group, torch.ones_like(r)
    )
    total = torch.zeros_like(count).index_add_(0, group, r)
    mean = total / count
    centered = r - mean[group]
    n = count[group]
    if estimator == "grpo":
        sq = torch.zeros_like(count).index_add_(0, group, centered.square())
        std = torch.sqrt(sq / (count - 1).clamp(min=1))
        advantages = centered / (std[group] + eps)
    elif estimator == "drgrpo":
        advantages = centered
    else:
        advantages = centered * n / (n - 1).clamp(min=1)
    advantages = torch.where(n > 1, advantages, r)
    return advantages.to(rewards.dtype if rewards.is_floating_point() else torch.float32)
