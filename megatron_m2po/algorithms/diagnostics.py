"""Diagnostics every policy loss returns, under one `loss/` namespace (same names in TensorBoard and docs).

All values are over this call's response tokens (one micro-batch on one rank); the trainer averages them
weighted by `loss/num_tokens`. They are gathered into one tensor and moved to the host with one sync.

loss/num_tokens, loss/num_sequences     response tokens / sequences with at least one token
loss/m2_before                          mean of M2 = (log r)^2 over the trust-region tokens T
loss/m2_after                           the same over the T tokens that keep their gradient (not masked or clipped)
loss/m2_all                             mean of M2 over all response tokens
loss/trust_region_fraction              |T| / num_tokens
loss/masked_fraction                    tokens masked by the loss (m2po) / num_tokens
loss/clip_fraction                      tokens clipped (gradient zero) or truncated (weight capped) / num_tokens
loss/ratio_p05, _p50, _p95, _min, _max  quantiles of r = pi_theta / mu (from <= 65536 evenly spaced tokens)
loss/kl_k3                              mean of r - 1 - log r: the k3 estimate of KL(mu || pi_theta), tokens ~ mu
loss/staleness_mean, loss/staleness_max over response tokens, when `staleness` is given
plus loss-specific values (loss/m2_threshold, loss/m2po_tau, loss/clip_low, ...) and loss/nonfinite_tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_m2po.algorithms.losses import LossInputs, TokenLoss

__all__ = ["policy_metrics"]

_QUANTILE_SAMPLE = 65536


def _mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return torch.where(where, values, 0.0).sum() / where.sum().clamp(min=1)


@torch.no_grad()
def policy_metrics(
    x: LossInputs,
    out: TokenLoss,
    *,
    staleness: torch.Tensor | None = None,
    extra: dict[str, float | torch.Tensor] | None = None,
) -> dict[str, float]:
    """The `loss/` metrics of one loss call (see the module docstring)."""
    mask = x.mask
    n_tokens = mask.sum()
    log_ratio = x.log_ratio.detach()
    ratio = x.ratio.detach()
    m2 = log_ratio.square()
    trust = x.trust_region
    none = torch.zeros_like(mask)
    masked = none if out.masked is None else out.masked & mask
    clipped = none if out.clipped is None else out.clipped & mask
    lost_gradient = masked if out.clipped_keeps_gradient else masked | clipped
    values: dict[str, torch.Tensor | float] = {
        "num_tokens": n_tokens,
        "num_sequences": mask.any(-1).sum(),
        "m2_before": _mean(m2, trust),
        "m2_after": _mean(m2, trust & ~lost_gradient),
        "m2_all": _mean(m2, mask),
        "trust_region_fraction": trust.sum() / n_tokens.clamp(min=1),
        "masked_fraction": masked.sum() / n_tokens.clamp(min=1),
        "clip_fraction": clipped.sum() / n_tokens.clamp(min=1),
        "kl_k3": _mean(ratio - 1 - log_ratio, mask),
    }
    valid_ratio = ratio[mask]
    if valid_ratio.numel():
        stride = max(1, valid_ratio.numel() // _QUANTILE_SAMPLE)
        sample = valid_ratio[::stride].double()
        q = torch.quantile(sample, torch.tensor([0.05, 0.5, 0.95], dtype=sample.dtype, device=sample.device))
        values.update(
            ratio_p05=q[0],
            ratio_p50=q[1],
            ratio_p95=q[2],
            ratio_min=valid_ratio.min(),
            ratio_max=valid_ratio.max(),
        )
    else:
        values.update(ratio_p05=1.0, ratio_p50=1.0, ratio_p95=1.0, ratio_min=1.0, ratio_max=1.0)
    if staleness is not None:
        s = staleness.to(torch.float64)
        values["staleness_mean"] = _mean(s, mask)
        values["staleness_max"] = torch.where(mask, s, 0.0).max() if s.numel() else 0.0
    values.update(extra or {})
    device = mask.device
    stacked = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()]
    )
    return {f"loss/{k}": float(v) for k, v in zip(values, stacked.tolist())}
