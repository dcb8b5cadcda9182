"""Diagnostics every policy loss returns, under one `loss/` namespace (same names in TensorBoard and docs).

All values are over this call's response tokens (one micro-batch on one rank); the trainer averages them
weighted by `loss/num_tokens`. They are gathered into one tensor and moved to the host with one sync.

loss/num_tokens, loss/num_sequences     response tokens / sequences with at least one token
loss/m2_before                          mean of M2 = (log r)^2 over the trust-region tokens T
loss/m2_after                           the same over the T tokens that keep their gradient (not masked or clipped)
loss/m2_all                             mean of M2 over all response tokens
loss/confident_fraction                 the T tokens the behaviour policy sampled with mu > 0.99 / |T|
loss/m2_before_unconfident              mean of M2 over the other T tokens (mu <= 0.99): where the answer's
                                        drift sits when near-certain tokens dilute the mean
loss/trust_region_fraction              |T| / num_tokens
loss/masked_fraction                    tokens masked by the loss (m2po) / num_tokens
loss/clip_fraction                      tokens clipped (gradient zero) or truncated (weight capped) / num_tokens
loss/ratio_p05, _p50, _p95, _min, _max  r = pi_theta / mu: quantiles from the response tokens among
                                        <= 65536 evenly spaced positions; exact min and max
loss/kl_k3                              mean of r - 1 - log r: the k3 estimate of KL(mu || pi_theta), tokens ~ mu
loss/staleness_mean, loss/staleness_max over response tokens, when `staleness` is given
plus loss-specific values (loss/m2_threshold, loss/m2po_tau, loss/clip_low, ...) and loss/nonfinite_tokens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_m2po.algorithms.losses import LossInputs, TokenLoss

__all__ = ["policy_metrics"]

_QUANTILE_SAMPLE = 65536
_CONFIDENT_LOG_P = math.log(0.99)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


@torch.no_grad()
def policy_metrics(
    x: LossInputs,
    out: TokenLoss,
    *,
    staleness: torch.Tensor | None = None,
    extra: dict[str, float | torch.Tensor] | None = None,
) -> dict[str, float]:
    """The `loss/` metrics of one loss call (see the module docstring)."""
    log_ratio = x.log_ratio.detach()
    ratio = x.ratio.detach()
    dtype = ratio.dtype
    mask = x.mask.to(dtype)
    trust = x.trust_region.to(dtype)
    none = torch.zeros_like(x.mask)
    masked = none if out.masked is None else out.masked & x.mask
    clipped = none if out.clipped is None else out.clipped & x.mask
    lost_gradient = masked if out.clipped_keeps_gradient else masked | clipped
    trust_kept = trust * (~lost_gradient).to(dtype)
    trust_unsure = trust * (x.behavior_logprobs.detach() <= _CONFIDENT_LOG_P).to(dtype)
    m2 = log_ratio.square()
    counts = torch.stack(
        [
            mask.sum(),
            trust.sum(),
            trust_kept.sum(),
            masked.sum().to(dtype),
            clipped.sum().to(dtype),
            trust_unsure.sum(),
        ]
    )
    sums = torch.stack(
        [
            _dot(m2, trust),
            _dot(m2, trust_kept),
            _dot(m2, mask),
            _dot(ratio - log_ratio, mask),
            _dot(m2, trust_unsure),
        ]
    )
    n, n_trust, n_kept, n_masked, n_clipped, n_unsure = counts.unbind()
    values: dict[str, torch.Tensor | float] = {
        "num_tokens": n,
        "num_sequences": x.mask.any(-1).sum(),
        "m2_before": sums[0] / n_trust.clamp(min=1),
        "m2_after": sums[1] / n_kept.clamp(min=1),
        "m2_all": sums[2] / n.clamp(min=1),
        "confident_fraction": (n_trust - n_unsure) / n_trust.clamp(min=1),
        "m2_before_unconfident": sums[4] / n_unsure.clamp(min=1),
        "trust_region_fraction": n_trust / n.clamp(min=1),
        "masked_fraction": n_masked / n.clamp(min=1),
        "clip_fraction": n_clipped / n.clamp(min=1),
        "kl_k3": (sums[3] - n) / n.clamp(min=1),  # mean of r - 1 - log r
    }
    flat_ratio, flat_mask = ratio.reshape(-1), x.mask.reshape(-1)
    stride = max(1, flat_ratio.numel() // _QUANTILE_SAMPLE)
    sample = flat_ratio[::stride][flat_mask[::stride]].double()
    if sample.numel():
        q = torch.quantile(sample, torch.tensor([0.05, 0.5, 0.95], dtype=sample.dtype, device=sample.device))
        big = torch.finfo(dtype).max
        values.update(
            ratio_p05=q[0],
            ratio_p50=q[1],
            ratio_p95=q[2],
            ratio_min=torch.where(x.mask, ratio, big).min(),
            ratio_max=torch.where(x.mask, ratio, 0.0).max(),
        )
    else:
        values.update(ratio_p05=1.0, ratio_p50=1.0, ratio_p95=1.0, ratio_min=1.0, ratio_max=1.0)
    if staleness is not None:
        s = staleness.to(torch.float64)
        values["staleness_mean"] = _dot(s, x.mask.to(torch.float64)) / n.clamp(min=1)
        values["staleness_max"] = torch.where(x.mask, s, 0.0).max() if s.numel() else 0.0
    values.update(extra or {})
    device = mask.device
    stacked = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()]
    )
    return {f"loss/{k}": float(v) for k, v in zip(values, stacked.tolist())}
