"""Rollout corrections: rules on the ratio rho between the trainer's probabilities and the engine's that weight
or drop tokens before any loss sees them, composable with every loss (`get_loss(..., corrections=[...])`).

Which two distributions rho compares depends on where the behaviour log-probs come from (docs/algorithms.md,
"Rollout corrections"):
* `rollout.behavior_logprobs=trainer` (sync / fixed): rho = mu_trainer / mu_engine, the trainer's recomputed
  behaviour probabilities over the engine's sampling ones at the same weights: the pure engine mismatch;
* `rollout.behavior_logprobs=engine` (every mode, `bounded` always): rho = pi_old / mu_engine, the current policy
  before this update over the engine's sampling probabilities: mismatch and staleness together. The loss's own
  ratio already divides by mu_engine there, so only the rules that drop tokens apply (`weights` False);
  a weight on the same ratio would count it twice.

Each rule is registered with `register_correction` with whether it weights; its thresholds are its
keyword-only parameters (as a loss's hyperparameters), and the `algorithm` config section has one key of the
same name for each. A rule returns the tokens it keeps and, if it weights, a stop-gradient weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import torch

from megatron_m2po.algorithms.hyperparameters import Positive, keyword_parameters
from megatron_m2po.choices import CorrectionName, WeightingCorrection

__all__ = ["CORRECTIONS", "Correction", "CorrectionSpec", "apply_corrections", "register_correction"]


@dataclass
class Correction:
    """One rule's outcome on [batch, T] tokens: which it keeps, and the weight of the kept ones (None: 1)."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None


@dataclass(frozen=True)
class CorrectionSpec:
    """A registered rule. weights: it multiplies the loss by a function of rho (not only drops tokens), so it
    needs a rho that the loss's ratio does not already contain (`rollout.behavior_logprobs=trainer`)."""

    name: str
    fn: Callable[..., Correction]
    weights: bool

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return keyword_parameters(self.fn)


CORRECTIONS: dict[str, CorrectionSpec] = {}


def register_correction(name: CorrectionName, *, weights: bool):
    """Register the decorated rule `(log_rho, mask, **thresholds) -> Correction` under `name`."""
    if name not in get_args(CorrectionName) or name in CORRECTIONS:
        raise ValueError(f"register_correction: {name!r} is not a new name of {get_args(CorrectionName)}")

    def register(fn):
        CORRECTIONS[name] = CorrectionSpec(name, fn, weights)
        return fn

    return register


def _within(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return (values >= low) & (values <= high)


def _sequence_log_rho(log_rho: torch.Tensor, mask: torch.Tensor, *, mean: bool) -> torch.Tensor:
    """sum_t log rho over each response (mean_t with `mean`), broadcast back over its tokens."""
    total = (log_rho * mask).sum(-1, keepdim=True)
    if mean:
        total = total / mask.sum(-1, keepdim=True).clamp(min=1)
    return total.expand_as(log_rho)


@register_correction("token_tis", weights=True)
def token_tis(
    log_rho: torch.Tensor, mask: torch.Tensor, *, engine_mismatch_tis_cap: Positive = 2.0
) -> Correction:
    """Token truncated IS: w_t = sg(min(rho_t, C)), C = engine_mismatch_tis_cap; every token kept."""
    return Correction(mask, torch.clamp(torch.exp(log_rho), max=engine_mismatch_tis_cap))


@register_correction("token_mis", weights=True)
def token_mis(
    log_rho: torch.Tensor, mask: torch.Tensor, *, mis_low: Positive = 0.5, mis_high: Positive = 2.0
) -> Correction:
    """Token masked IS: w_t = sg(rho_t) where mis_low <= rho_t <= mis_high; the other tokens are dropped."""
    rho = torch.exp(log_rho)
    return Correction(mask & _within(rho, mis_low, mis_high), rho)


@register_correction("icepop", weights=False)
def icepop(
    log_rho: torch.Tensor, mask: torch.Tensor, *, icepop_low: Positive = 0.5, icepop_high: Positive = 5.0
) -> Correction:
    """IcePop: drop the tokens with rho_t outside [icepop_low, icepop_high]; no weight on the kept ones."""
    return Correction(mask & _within(torch.exp(log_rho), icepop_low, icepop_high))


@register_correction("seq_geo_mask", weights=False)
def seq_geo_mask(
    log_rho: torch.Tensor,
    mask: torch.Tensor,
    *,
    geo_mask_low: Positive = 0.999,
    geo_mask_high: Positive = 1.001,
) -> Correction:
    """Sequence mask on the geometric mean: drop response i when exp(mean_t log rho_it) leaves
    [geo_mask_low, geo_mask_high] (length-independent)."""
    geo = torch.exp(_sequence_log_rho(log_rho, mask, mean=True))
    return Correction(mask & _within(geo, geo_mask_low, geo_mask_high))


@register_correction("seq_product_mask", weights=False)
def seq_product_mask(
    log_rho: torch.Tensor, mask: torch.Tensor, *, seq_mask_low: Positive = 0.5, seq_mask_high: Positive = 2.0
) -> Correction:
    """Sequence mask on the product: drop response i when exp(sum_t log rho_it) leaves
    [seq_mask_low, seq_mask_high] (the sequence's own importance ratio)."""
    product = torch.exp(_sequence_log_rho(log_rho, mask, mean=False))
    return Correction(mask & _within(product, seq_mask_low, seq_mask_high))


if set(CORRECTIONS) != set(get_args(CorrectionName)):
    raise ImportError(f"corrections: {sorted(set(get_args(CorrectionName)) - set(CORRECTIONS))} unregistered")
if {n for n, spec in CORRECTIONS.items() if spec.weights} != set(get_args(WeightingCorrection)):
    raise ImportError("corrections: the rules that weight are not choices.WeightingCorrection")


def correction_hyperparameters() -> dict[str, Any]:
    """Every rule's thresholds (keyword-only parameters) by name; no two rules share a name."""
    out: dict[str, Any] = {}
    for spec in CORRECTIONS.values():
        out.update(spec.hyperparameters)
    return out


def check_thresholds(names: tuple[str, ...], settings: dict[str, Any]) -> None:
    """Raise ValueError naming the keys when a rule's `*_low` is not below its `*_high`."""
    for name in names:
        params = CORRECTIONS[name].hyperparameters
        values = {k: settings.get(k, p.default) for k, p in params.items()}
        for low in [k for k in values if k.endswith("_low")]:
            high = low[: -len("_low")] + "_high"
            if high in values and not values[low] < values[high]:
                raise ValueError(f"{name}: {low}={values[low]} must be below {high}={values[high]}")


def apply_corrections(
    names: tuple[str, ...], settings: dict[str, Any], log_rho: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """The rules `names` in order on log rho [batch, T] inside `mask`: (the tokens all of them keep, the product
    of their weights or None, metrics). Each rule sees the tokens the earlier ones kept; `masked_fraction` is
    the share of `mask`'s tokens that rule dropped."""
    log_rho = torch.where(mask, log_rho.detach(), 0.0)
    keep, weight = mask, None
    n = mask.sum().clamp(min=1)
    metrics: dict[str, float] = {}
    for name in names:
        spec = CORRECTIONS[name]
        kwargs = {k: settings[k] for k in spec.hyperparameters if k in settings}
        out = spec.fn(log_rho, keep, **kwargs)
        now = keep & out.keep
        metrics[f"correction_{name}_masked_fraction"] = float((keep & ~now).sum() / n)
        keep = now
        if out.weight is not None:
            weight = out.weight if weight is None else weight * out.weight
            metrics[f"correction_{name}_weight_mean"] = float(
                (out.weight * keep).sum() / keep.sum().clamp(min=1)
            )
    rho = torch.exp(log_rho)[mask]
    if rho.numel():
        metrics.update(
            correction_ratio_mean=float(rho.mean()),
            correction_ratio_std=float(rho.std(unbiased=False)),
            correction_ratio_max=float(rho.max()),
            correction_inverse_ratio_max=float((1 / rho).max()),
            correction_kept_fraction=float(keep.sum() / n),
        )
    return keep, None if weight is None else weight.detach(), metrics
