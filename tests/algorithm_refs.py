"""Independent float64 references for the loss tests: literal transcriptions, written without the package.

`algorithm1` is the paper's Algorithm 1 (the while loop); `released_m2po_clip_loss` is the released code's
`compute_m2po_policy_loss` (kpo_clip_harmful_tokens + _solve_tau_from_sorted_delta2 with its Python loop),
transcribed step by step (prints removed, token-mean only). Run them with float64 tensors.
"""

from __future__ import annotations

import math

import torch


def released_trust_region(log_ratio, advantages_per_seq, mask):
    """The released `_get_trust_region_tokens_delta_sq` set, as a [batch, T] bool mask."""
    ratio = torch.exp(log_ratio)
    pos = (advantages_per_seq > 1e-12)[:, None] & (ratio > 1.0 + 1e-12)
    neg = (advantages_per_seq < -1e-12)[:, None] & (ratio < 1.0 - 1e-12)
    return mask & (pos | neg)


def algorithm1(m2: list[float], in_trust_region: list[bool], tau: float) -> list[bool]:
    """Paper, Algorithm 1: returns M (True = token kept)."""
    keep = [True] * len(m2)
    region = [i for i, t in enumerate(in_trust_region) if t]
    while region and sum(m2[i] for i in region) / len(region) > tau:
        j = max(region, key=lambda i: m2[i])  # argmax; first such index on ties
        keep[j] = False
        region.remove(j)
    return keep


def released_solve_tau(sorted_delta2: torch.Tensor, target_sum: float):
    """`_solve_tau_from_sorted_delta2` of the released code (its Python loop, one .item() per token)."""
    if sorted_delta2.numel() == 0:
        return 100000
    total = float(sorted_delta2.sum().item())
    if target_sum >= total - 1e-12:
        return 100000
    if target_sum <= 1e-12:
        return 0.0
    csum = torch.cumsum(sorted_delta2, dim=0)
    n = sorted_delta2.numel()
    for k in range(0, n):
        left_sum = float(csum[k].item())
        rest = n - k - 1
        m2 = sorted_delta2[k].item() - 1e-12
        if m2 * rest + left_sum >= target_sum - 1e-12:
            if k == 0:
                return 0.0, csum[-1].item() / n
            m2_after = (sorted_delta2[k - 1].item() * (rest + 1) + float(csum[k - 1].item())) / n
            # Released: `float(s - 1e-12) ** 0.5`, a complex number when s_{k-1} < 1e-12, on which its
            # `float(torch.exp(torch.tensor(-tau)))` raises. The formula on its domain: tau^2 = 0.
            return max(float(sorted_delta2[k - 1].item() - 1e-12), 0.0) ** 0.5, m2_after
    return 100000


def released_clip_bounds(old_log_prob, log_prob, advantages, response_mask, budget):
    """`kpo_clip_harmful_tokens`: (clip_low, clip_high, M2_now, M2_after), tau-derived ratio bounds."""
    mask = response_mask.bool()
    adv_example = advantages[:, 0]
    pos_adv_mask = adv_example > 1e-12
    neg_adv_mask = adv_example < -1e-12
    delta = old_log_prob - log_prob
    ratio = torch.exp(-delta)
    pos_r = ratio[pos_adv_mask] > 1.0 + 1e-12
    neg_r = ratio[neg_adv_mask] < 1.0 - 1e-12
    delta_sq = delta.pow(2)
    tr = torch.cat(
        [
            delta_sq[pos_adv_mask][pos_r & mask[pos_adv_mask]],
            delta_sq[neg_adv_mask][neg_r & mask[neg_adv_mask]],
        ]
    )
    n = tr.numel()
    if n == 0:
        return 0.0, 100000, 0.0, 0.0
    target_total = budget * float(n)
    m2_now = float(tr.sum().detach().item() / n)
    if m2_now <= budget + 1e-12:
        return 0.0, 100000, m2_now, m2_now
    sorted_delta2, _ = torch.sort(tr)
    tau, m2_after = released_solve_tau(sorted_delta2, target_total)
    clip_low = float(torch.exp(torch.tensor(-tau, dtype=torch.float64)).item())
    clip_high = float(torch.exp(torch.tensor(+tau, dtype=torch.float64)).item())
    return clip_low, clip_high, m2_now, m2_after


def released_m2po_clip_loss(
    old_log_prob, log_prob, advantages, response_mask, budget, miniclip_low=None, miniclip_high=None
):
    """`compute_m2po_policy_loss`, token-mean; returns (loss, clipfrac, tau-derived bounds)."""
    clip_low, clip_high, _, m2_after = released_clip_bounds(
        old_log_prob, log_prob, advantages, response_mask, budget
    )
    clip_low = 1 - clip_low
    clip_high = clip_high - 1
    if miniclip_low is not None and clip_low < miniclip_low:
        clip_low = miniclip_low
    if miniclip_high is not None and clip_high < miniclip_high:
        clip_high = miniclip_high
    ratio = torch.exp(log_prob - old_log_prob)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    m = response_mask.to(clip_pg_losses1.dtype)
    pg_clipfrac = (torch.gt(pg_losses2, pg_losses1).to(m.dtype) * m).sum() / m.sum().clamp_min(1)
    pg_loss = (clip_pg_losses1 * m).sum() / m.sum().clamp_min(1)
    return pg_loss, pg_clipfrac, (1 - clip_low, 1 + clip_high), m2_after


def rollout_correction(name: str, log_rho, mask, **t):
    """One rollout correction, token by token in Python: (keep [batch, T] bool, weight [batch, T] or None)."""
    b, n = log_rho.shape
    keep = [[bool(mask[i, j]) for j in range(n)] for i in range(b)]
    weight = None
    rho = [[math.exp(float(log_rho[i, j])) for j in range(n)] for i in range(b)]
    if name == "token_tis":
        weight = [[min(rho[i][j], t.get("engine_mismatch_tis_cap", 2.0)) for j in range(n)] for i in range(b)]
    elif name in ("token_mis", "icepop"):
        lo, hi = (
            (t.get("mis_low", 0.5), t.get("mis_high", 2.0))
            if name == "token_mis"
            else (t.get("icepop_low", 0.5), t.get("icepop_high", 5.0))
        )
        keep = [[keep[i][j] and lo <= rho[i][j] <= hi for j in range(n)] for i in range(b)]
        if name == "token_mis":
            weight = rho
    else:
        lo, hi = (
            (t.get("geo_mask_low", 0.999), t.get("geo_mask_high", 1.001))
            if name == "seq_geo_mask"
            else (t.get("seq_mask_low", 0.5), t.get("seq_mask_high", 2.0))
        )
        for i in range(b):
            logs = [float(log_rho[i, j]) for j in range(n) if mask[i, j]]
            if not logs:
                continue
            value = math.exp(sum(logs) / len(logs) if name == "seq_geo_mask" else sum(logs))
            if not lo <= value <= hi:
                keep[i] = [False] * n
    as_tensor = torch.tensor(keep, dtype=torch.bool)
    return as_tensor, None if weight is None else torch.tensor(weight, dtype=torch.float64)
