"""The two M2PO token selections: the paper's mask (Algorithm 1) and the released code's water-filling tau.

Trust-region tokens T (both variants, defined as the released code's `_get_trust_region_tokens_delta_sq`):
the update pushes the ratio further from 1, (A > 1e-12 and r > 1 + 1e-12) or (A < -1e-12 and r < 1 - 1e-12),
with r = exp(log pi_theta - log mu) in the log-probs' dtype. Tokens outside T are never masked or clipped.

`m2po` (paper, Algorithm 1): while mean_T(M2) > tau_M2, drop the largest M2 token of T. Removing the largest
value never raises the mean, so this keeps the k smallest values of T, k the largest count whose mean is
<= tau_M2; the kept part is {M2 <= theta}. We find theta exactly, across data-parallel ranks and micro-batches,
without gathering tokens:

* M2 = (log r)^2 is rounded to the grid 2^-24 (~6e-8) and stored as an integer q (values above 2^27, i.e.
  |log r| > 11585, are clamped: they are masked anyway). Sums of integers are exact whatever the summation
  order, so the selection does not depend on how the mini-batch is split over ranks or micro-batches.
* h(t) = sum over q_i <= t of (q_i - tau) is non-increasing for t < tau and non-decreasing after, with
  h(-1) = 0, so {t : h(t) <= 0} is an interval [0, t*]. t* is found by a 64-way search over integers: each
  round all-reduces (count, sum) at 63 candidate thresholds ([63, 3] int64), about 9 rounds. Locally only
  the T values above tau are sorted (those below tau are always kept); no Python loop runs over tokens.
* Ties: the mask is a threshold on values, so copies of one value are kept or masked together. Algorithm 1
  may drop only some copies of a tied value; we then drop all of them (a few more tokens; the bound still
  holds and unmasking all copies of the smallest masked value breaks it).
* The bound is tested on the grid values: mean_T(M2) after masking is <= tau_M2 + 3e-8.

`m2po_clip` (released `kpo_clip_harmful_tokens` + `_solve_tau_from_sorted_delta2`): sort delta^2 of T,
find the first k where sum_{i<=k} s_i + (s_k - 1e-12) * (n - k - 1) >= budget * n - 1e-12 (the capped sum
reaches the budget), tau^2 = s_{k-1} - 1e-12 (tau = 0 if k = 0). The released code loops in Python with a
device sync per token; here one sort, one cumsum and one argmax give the same k, hence the same tau.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist

__all__ = [
    "M2_GRID",
    "compute_m2_threshold",
    "m2po_masked_tokens",
    "quantized_m2",
    "trust_region_mask",
    "water_filling_tau",
    "WaterFillingResult",
]

_GRID_BITS = 24
M2_GRID = 2.0**-_GRID_BITS  # resolution of the M2 values used by the m2po selection
_M2_CLAMP = 2.0**27  # q <= 2^51: exact in float64 and splittable into two 26-bit halves
_HALF_BITS = 26
_SEARCH_WAYS = 64
_RELEASED_EPS = 1e-12  # the released code's tolerance, kept wherever it decides a set or a bound


def trust_region_mask(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens whose update moves r = pi/mu away from 1: (A > 0, r > 1) or (A < 0, r < 1), as the released code.

    `ratio`: exp(log_ratio) when the caller already has it.
    """
    ratio = torch.exp(log_ratio) if ratio is None else ratio
    up = (advantages > _RELEASED_EPS) & (ratio > 1.0 + _RELEASED_EPS)
    down = (advantages < -_RELEASED_EPS) & (ratio < 1.0 - _RELEASED_EPS)
    return response_mask & (up | down)


def quantized_m2(log_ratio: torch.Tensor) -> torch.Tensor:
    """M2 = (log r)^2 in units of M2_GRID, as integer-valued float64 (exact up to 2^51)."""
    return torch.round(log_ratio.double().square().clamp(max=_M2_CLAMP) / M2_GRID)


def m2po_masked_tokens(q_m2: torch.Tensor, trust_region: torch.Tensor, threshold: float) -> torch.Tensor:
    """Tokens Algorithm 1 removes: in T with M2 above the kept threshold (a value from compute_m2_threshold)."""
    if math.isinf(threshold):
        return torch.zeros_like(trust_region)
    return trust_region & (q_m2 > threshold / M2_GRID)


def _as_list(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _world(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


@torch.no_grad()
def compute_m2_threshold(
    logprobs: torch.Tensor | Sequence[torch.Tensor],
    behavior_logprobs: torch.Tensor | Sequence[torch.Tensor],
    advantages: torch.Tensor | Sequence[torch.Tensor],
    response_mask: torch.Tensor | Sequence[torch.Tensor],
    *,
    m2_budget: float,
    process_group: dist.ProcessGroup | None = None,
) -> float:
    """theta such that `m2po` keeps exactly the trust-region tokens with M2 <= theta (inf: nothing masked).

    Exact over every micro-batch passed (each argument a tensor [batch, T] or a list of them, one per
    micro-batch, shapes matching pairwise) and over all ranks of `process_group` (the data-parallel group;
    every rank must call it). The trainer calls it once per optimizer mini-batch with log pi_theta from a
    no-grad forward, then passes `m2_threshold=theta` to every micro-batch's `m2po` loss.
    """
    if not m2_budget > 0:
        raise ValueError(f"compute_m2_threshold: m2_budget must be > 0, got {m2_budget}")
    parts = [_as_list(t) for t in (logprobs, behavior_logprobs, advantages, response_mask)]
    if len({len(p) for p in parts}) != 1:
        raise ValueError(
            "compute_m2_threshold: logprobs, behavior_logprobs, advantages, response_mask must hold the same "
            f"number of micro-batches, got {[len(p) for p in parts]}"
        )
    tau = Fraction(m2_budget) / Fraction(M2_GRID)
    local = []
    for i, (lp, blp, adv, mask) in enumerate(zip(*parts)):
        if not (lp.shape == blp.shape == adv.shape == mask.shape):
            raise ValueError(
                f"compute_m2_threshold: micro-batch {i}: logprobs {tuple(lp.shape)}, behavior_logprobs "
                f"{tuple(blp.shape)}, advantages {tuple(adv.shape)}, response_mask {tuple(mask.shape)} differ"
            )
        mask = mask.bool()
        dtype = torch.promote_types(lp.dtype, torch.float32)  # the loss's arithmetic, so M2 is bit-identical
        log_ratio = torch.where(mask, lp.detach().to(dtype) - blp.to(dtype), 0.0)
        trust = trust_region_mask(log_ratio, torch.where(mask, adv.to(dtype), 0.0), mask)
        local.append(_local_m2_stats(quantized_m2(log_ratio), trust, tau))
    return threshold_from_stats(local, tau, process_group)


def threshold_of_tokens(
    q_m2: torch.Tensor, trust_region: torch.Tensor, m2_budget: float, process_group: dist.ProcessGroup | None
) -> float:
    """compute_m2_threshold for one call whose quantized M2 and trust region are already at hand."""
    tau = Fraction(m2_budget) / Fraction(M2_GRID)
    return threshold_from_stats([_local_m2_stats(q_m2, trust_region, tau)], tau, process_group)


@dataclass
class _LocalM2Stats:
    """One micro-batch's trust-region M2 (grid units): count and exact sum of values <= tau, and the rest."""

    small_count: int
    small_sum: int
    big: torch.Tensor  # int64, values > tau (the only ones that can be masked)


def _local_m2_stats(q_m2: torch.Tensor, trust: torch.Tensor, tau: Fraction) -> _LocalM2Stats:
    always_kept = math.floor(tau)  # every value <= tau can stay
    small = trust & (q_m2 <= always_kept)
    small_q = torch.where(small, q_m2, 0.0).long()
    halves = torch.stack(
        [(small_q >> _HALF_BITS).sum(), (small_q & ((1 << _HALF_BITS) - 1)).sum(), small.sum()]
    )
    high, low, count = halves.tolist()
    return _LocalM2Stats(count, (high << _HALF_BITS) + low, q_m2[trust & (q_m2 > always_kept)].long())


def threshold_from_stats(local: list[_LocalM2Stats], tau: Fraction, group: dist.ProcessGroup | None) -> float:
    """theta from per-micro-batch statistics, combined over `group` (see compute_m2_threshold)."""
    device = local[0].big.device if local else torch.device("cpu")
    big = torch.cat([s.big for s in local]) if local else torch.zeros(0, dtype=torch.long, device=device)
    small_count = sum(s.small_count for s in local)
    small_sum = sum(s.small_sum for s in local)
    kept_max = _largest_kept_value(big, small_count, small_sum, tau, group)
    return math.inf if kept_max is None else kept_max * M2_GRID


def _split_sums(sorted_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums of the high and low 26-bit halves (each fits int64 for < 2^37 tokens), leading 0."""
    zero = torch.zeros(1, dtype=torch.long, device=sorted_q.device)
    high = torch.cat([zero, torch.cumsum(sorted_q >> _HALF_BITS, 0)])
    low = torch.cat([zero, torch.cumsum(sorted_q & ((1 << _HALF_BITS) - 1), 0)])
    return high, low


def _largest_kept_value(
    big: torch.Tensor, small_count: int, small_sum: int, tau: Fraction, group: dist.ProcessGroup | None
) -> int | None:
    """Largest integer t with sum_{q_i <= t} q_i <= tau * #{q_i <= t} over all ranks; None if t = max(q) passes.

    `big`: this rank's values above tau; values <= tau enter only through their count and exact sum.
    """
    world = _world(group)
    always_kept = math.floor(tau)
    big = torch.sort(big).values
    high, low = _split_sums(big)
    base = torch.tensor(
        [small_count, small_sum >> _HALF_BITS, small_sum & ((1 << _HALF_BITS) - 1)], dtype=torch.long
    )

    def global_stats(candidates: list[int]) -> list[tuple[int, int]]:
        cands = torch.tensor(candidates, dtype=torch.long, device=big.device)
        idx = torch.searchsorted(big, cands, right=True)
        local = torch.stack([idx, high[idx], low[idx]], dim=1).cpu() + base
        if world > 1:
            local = local.to(big.device)
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
        rows = local.cpu().tolist()
        return [(c, (h << _HALF_BITS) + lo) for c, h, lo in rows]

    def within_budget(count: int, total: int) -> bool:
        return total * tau.denominator <= tau.numerator * count

    top = torch.tensor([int(big[-1]) if big.numel() else always_kept], dtype=torch.long, device=big.device)
    if world > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    hi = int(top.item())
    if hi <= always_kept or within_budget(*global_stats([hi])[0]):
        return None
    lo = always_kept  # invariant: lo passes, hi fails
    while hi - lo > 1:
        step = hi - lo
        candidates = sorted({lo + step * j // _SEARCH_WAYS for j in range(1, _SEARCH_WAYS)} - {lo, hi})
        for cand, stats in zip(candidates, global_stats(candidates)):
            if within_budget(*stats):
                lo = cand
            else:
                hi = cand
                break
    return lo


@dataclass
class WaterFillingResult:
    """The released m2po_clip solve: tau (None = no constraint), M2 of T before, and the capped M2 after."""

    tau: float | None
    m2_before: float
    m2_after: float


@torch.no_grad()
def water_filling_tau(trust_region_m2: torch.Tensor, m2_budget: float) -> WaterFillingResult:
    """The released `_solve_tau_from_sorted_delta2`, vectorised: same k, same tau, in float64.

    `trust_region_m2`: delta^2 = (log mu - log pi)^2 of the trust-region tokens (1-D, any order).
    Differences from the released code, all in unreachable or degenerate cases: it returns a bare 100000
    (then fails to unpack) where the capped sum never reaches the budget; it takes a complex square root
    when s_{k-1} < 1e-12; here these give "no constraint" and tau = 0.
    """
    values = trust_region_m2.detach().double().flatten()
    n = values.numel()
    if n == 0:
        return WaterFillingResult(None, 0.0, 0.0)
    m2_now = float(values.sum().item() / n)
    if m2_now <= m2_budget + _RELEASED_EPS:
        return WaterFillingResult(None, m2_now, m2_now)
    s = torch.sort(values).values
    csum = torch.cumsum(s, 0)
    target = m2_budget * float(n)
    rest = torch.arange(n - 1, -1, -1, dtype=torch.float64, device=s.device)  # n - k - 1
    reaches = (s - _RELEASED_EPS) * rest + csum >= target - _RELEASED_EPS
    if not bool(reaches.any()):
        return WaterFillingResult(None, m2_now, m2_now)
    k = int(reaches.to(torch.uint8).argmax())
    if k == 0:
        return WaterFillingResult(0.0, m2_now, float(csum[-1].item()) / n)
    prev = s[k - 1].item()
    m2_after = (prev * (n - k) + float(csum[k - 1].item())) / n
    return WaterFillingResult(max(prev - _RELEASED_EPS, 0.0) ** 0.5, m2_now, m2_after)
