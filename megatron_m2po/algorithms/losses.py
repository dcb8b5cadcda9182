"""M2PO and the baseline policy losses, one interface: `get_loss(name, **hyperparameters)`.

Notation (docs/algorithms.md, "Notation"): for response token t of sequence i, log r = log pi_theta - log mu
(mu = the behaviour policy that sampled it), r = exp(log r), A the advantage, sg() stop-gradient,
M2 = (log r)^2, T the trust-region tokens (A > 0, r > 1) or (A < 0, r < 1). Each loss below is a per-token loss l_t; the
wrapper first applies the rollout corrections (corrections.py: they drop tokens before the loss and its M2
mask see them, and weight the kept ones), then aggregates (token-mean by default).

Each loss is registered with `register_loss` (as verl's `register_policy_loss`) with its default aggregation
and whether it needs the trainer's log-probs of the whole mini-batch before the update
(`needs_current_logprobs`, then `inputs_before_update`). Its hyperparameters are its keyword-only parameters:
the signature holds their names, defaults and allowed values (`hyperparameters.py`), and the `algorithm`
config section has one key of the same name for each, so `PolicyLoss.from_config` needs no list of them.
The trainer asks the loss (what it needs, what its normaliser counts); it never compares loss names.

Behaviour log-probs, two sources (both supported, the trainer picks, `behavior_logprobs=`):
* engine: `behavior_logprobs` = the engine's sampling log-probs; the engine-vs-trainer mismatch is then
  inside r, and the corrections compare pi_old (the current policy before the update) with the engine.
* trainer-recomputed (the released M2PO code): `behavior_logprobs` = log-probs recomputed by the trainer
  with the producing weights when the batch was produced; pass the engine's as `engine_logprobs`, and the
  corrections compare the two (e.g. `token_tis`: weight min(exp(behavior - engine), engine_mismatch_tis_cap)).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args

import torch
import torch.distributed as dist
from annotated_types import Gt

from megatron_m2po.algorithms.corrections import (
    CORRECTIONS,
    apply_corrections,
    check_thresholds,
    correction_hyperparameters,
)
from megatron_m2po.algorithms.diagnostics import policy_metrics
from megatron_m2po.algorithms.hyperparameters import Positive, check, keyword_parameters
from megatron_m2po.algorithms.m2po_mask import (
    compute_m2_threshold,
    m2po_masked_tokens,
    quantized_m2,
    threshold_of_tokens,
    trust_region_mask,
    water_filling_tau,
)
from megatron_m2po.choices import Aggregation, BehaviorSource, LossName, M2Scope, NonFinite

__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "CurrentLogprobs",
    "LossInputs",
    "LossSpec",
    "PolicyLoss",
    "TokenLoss",
    "aggregate",
    "get_loss",
    "register_loss",
]

AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
_RELEASED_NO_BOUND = (0.0, 100000.0)  # the released m2po_clip's ratio bounds when M2 is within budget


@dataclass
class LossInputs:
    """What every loss sees: validated [batch, T] tensors, zeros outside the response mask."""

    logprobs: torch.Tensor  # log pi_theta, differentiable
    behavior_logprobs: torch.Tensor  # log mu
    advantages: torch.Tensor
    mask: torch.Tensor  # bool
    log_ratio: torch.Tensor  # log r, differentiable
    ratio: torch.Tensor  # r, differentiable
    trust_region: torch.Tensor  # bool, T
    proximal_logprobs: torch.Tensor | None = None
    m2_threshold: float | None = None
    process_group: dist.ProcessGroup | None = None


@dataclass
class TokenLoss:
    """A loss's per-token value and which tokens it masked (no gradient) or clipped/truncated."""

    per_token: torch.Tensor
    masked: torch.Tensor | None = None
    clipped: torch.Tensor | None = None
    # truncation (tis, cispo, topr) scales the gradient; clipping (grpo, m2po_clip, ...) zeroes it
    clipped_keeps_gradient: bool = False
    extra: dict[str, float | torch.Tensor] = field(default_factory=dict)


def _ppo_clip(advantages, ratio, low, high):
    """max(-A r, -A clip(r, low, high)) and where the clipped branch wins (its gradient is zero there)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, low, high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@dataclass
class CurrentLogprobs:
    """One optimizer mini-batch before its update, per micro-batch ([b, T] each): the trainer's no-grad
    log pi_theta and what each micro-batch's loss call receives. `process_group`: the data-parallel group."""

    logprobs: Sequence[torch.Tensor]
    behavior_logprobs: Sequence[torch.Tensor]
    advantages: Sequence[torch.Tensor]
    response_mask: Sequence[torch.Tensor]
    process_group: dist.ProcessGroup | None = None
    engine_logprobs: Sequence[torch.Tensor] | None = None  # given when the loss `needs_engine_logprobs`


def _never(hyperparameters: dict[str, Any]) -> bool:
    return False


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the per-token function, its default aggregation, and what it needs.

    hyperparameters: the function's keyword-only parameters (`hyperparameters.keyword_parameters`).
    needs_current_logprobs: (hyperparameters) -> whether the trainer must run a no-grad forward of the
    whole mini-batch before the update; before_update: (hyperparameters, CurrentLogprobs) -> the extra
    keyword arguments of each micro-batch's loss call.
    """

    name: str
    fn: Callable[..., TokenLoss]
    aggregation: Aggregation = "token-mean"
    needs_current_logprobs: Callable[[dict[str, Any]], bool] = _never
    before_update: Callable[[dict[str, Any], CurrentLogprobs], list[dict[str, Any]]] | None = None

    @property
    def hyperparameters(self) -> dict[str, inspect.Parameter]:
        return keyword_parameters(self.fn)


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: LossName,
    *,
    aggregation: Aggregation = "token-mean",
    needs_current_logprobs: Callable[[dict[str, Any]], bool] = _never,
    before_update: Callable[[dict[str, Any], CurrentLogprobs], list[dict[str, Any]]] | None = None,
) -> Callable[[Callable[..., TokenLoss]], Callable[..., TokenLoss]]:
    """Register the decorated per-token loss under `name` (one of `choices.LossName`); see LossSpec."""
    if name not in get_args(LossName) or name in LOSSES:
        raise ValueError(
            f"register_loss: {name!r} is not a new name of choices.LossName {get_args(LossName)}"
        )
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"register_loss({name!r}): aggregation must be one of {AGGREGATIONS}")

    def register(fn: Callable[..., TokenLoss]) -> Callable[..., TokenLoss]:
        LOSSES[name] = LossSpec(name, fn, aggregation, needs_current_logprobs, before_update)
        return fn

    return register


def _given(**hyperparameters) -> dict[str, Any]:
    """The hyperparameters the config sets; None (unset) leaves the loss's own default."""
    return {k: v for k, v in hyperparameters.items() if v is not None}


def _m2po_global(hyperparameters: dict[str, Any]) -> bool:
    return hyperparameters["m2_scope"] == "global"


def _m2po_threshold(hyperparameters: dict[str, Any], current: CurrentLogprobs) -> list[dict[str, Any]]:
    """The mini-batch's exact m2 threshold over every micro-batch and DP rank (`compute_m2_threshold`)."""
    theta = compute_m2_threshold(
        current.logprobs,
        current.behavior_logprobs,
        current.advantages,
        current.response_mask,
        m2_budget=hyperparameters["m2_budget"],
        process_group=current.process_group,
    )
    return [{"m2_threshold": theta} for _ in current.logprobs]


def _proximal(hyperparameters: dict[str, Any], current: CurrentLogprobs) -> list[dict[str, Any]]:
    """decoupled_ppo's proximal policy: log-probs just before this update."""
    return [{"proximal_logprobs": lp} for lp in current.logprobs]


# ---------------------------------------------------------------------------------------------- the losses


@register_loss("m2po", needs_current_logprobs=_m2po_global, before_update=_m2po_threshold)
def m2po(x: LossInputs, *, m2_budget: Positive = 0.04, m2_scope: M2Scope = "global") -> TokenLoss:
    """M2PO, paper (Algorithm 1): l_t = -M_t r_t A_t, no clipping.

    M_t = 0 for the largest-M2 tokens of T until mean_T(M2) <= tau_M2 (= m2_budget); masked tokens still count
    in the normaliser. m2_scope "global": the caller's `m2_threshold` (compute_m2_threshold over the optimizer
    mini-batch), or if absent the threshold over this call across `process_group`; "per_microbatch": this
    call's tokens only (the released runs).
    """
    if x.m2_threshold is not None and m2_scope == "per_microbatch":
        raise ValueError("m2po: m2_threshold was passed but m2_scope='per_microbatch' computes its own")
    q_m2 = quantized_m2(x.log_ratio.detach())
    theta = x.m2_threshold
    if theta is None:
        group = x.process_group if m2_scope == "global" else None
        theta = threshold_of_tokens(q_m2, x.trust_region, m2_budget, group)
    masked = m2po_masked_tokens(q_m2, x.trust_region, theta)
    per_token = torch.where(masked, 0.0, -x.advantages * x.ratio)
    return TokenLoss(per_token, masked=masked, extra={"m2_threshold": min(theta, 1e30)})


@register_loss("m2po_clip")
def m2po_clip(
    x: LossInputs,
    *,
    m2_budget: Positive = 0.04,
    miniclip_low: Positive | None = None,
    miniclip_high: Positive | None = None,
) -> TokenLoss:
    """M2PO, released code: l_t = max(-A r, -A clip(r, 1 - eps_lo, 1 + eps_hi)), per micro-batch.

    tau by water-filling on the M2 of T (m2po_mask.water_filling_tau); eps_lo = 1 - exp(-tau), eps_hi =
    exp(tau) - 1, raised to the floors miniclip_low / miniclip_high when given (released defaults 0.3 / 0.5,
    off in its training path, so off here). M2 within budget: ratio bounds [0, 1e5] as released.
    """
    solve = water_filling_tau(x.log_ratio.detach().double().square()[x.trust_region], m2_budget)
    if solve.tau is None:
        low_bound, high_bound = _RELEASED_NO_BOUND
    else:
        tau = torch.tensor(solve.tau, dtype=torch.float64)
        low_bound, high_bound = torch.exp(-tau).item(), torch.exp(tau).item()
    eps_low, eps_high = 1 - low_bound, high_bound - 1
    if miniclip_low is not None and eps_low < miniclip_low:
        eps_low = miniclip_low
    if miniclip_high is not None and eps_high < miniclip_high:
        eps_high = miniclip_high
    per_token, clipped = _ppo_clip(x.advantages, x.ratio, 1 - eps_low, 1 + eps_high)
    extra = {
        "m2po_tau": -1.0 if solve.tau is None else solve.tau,
        "m2_capped": solve.m2_after,
        "clip_low": 1 - eps_low,
        "clip_high": 1 + eps_high,
    }
    return TokenLoss(per_token, clipped=clipped, extra=extra)


@register_loss("grpo")
def grpo(
    x: LossInputs,
    *,
    clip_eps: Positive = 0.2,
    clip_eps_high: Positive | None = None,
    dual_clip: Annotated[float, Gt(1)] | None = None,
) -> TokenLoss:
    """PPO-clip / GRPO: l_t = max(-A r, -A clip(r, 1 - eps, 1 + eps_high)), eps = clip_eps, eps_high =
    clip_eps_high (default clip_eps); clip-higher when eps_high > eps.

    Dual-clip (c = dual_clip, e.g. 3; None = off): for A < 0, l_t = min(l_t, -A c), bounding the loss of very large r.
    """
    per_token, clipped = _ppo_clip(
        x.advantages, x.ratio, 1 - clip_eps, 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    )
    if dual_clip is not None:
        bound = -x.advantages * dual_clip
        dual = (x.advantages < 0) & (bound < per_token)
        per_token = torch.where(dual, bound, per_token)
        clipped = clipped | dual
    return TokenLoss(per_token, clipped=clipped)


@register_loss("grpo_noclip")
def grpo_noclip(x: LossInputs) -> TokenLoss:
    """Plain importance sampling, eps = infinity: l_t = -A r (the paper's "prosperity before collapse")."""
    return TokenLoss(-x.advantages * x.ratio)


@register_loss("on_policy")
def on_policy(x: LossInputs) -> TokenLoss:
    """Sanity baseline: l_t = -A exp(log pi - sg(log pi)): value -A (r == 1), gradient -A grad log pi."""
    return TokenLoss(-x.advantages * torch.exp(x.logprobs - x.logprobs.detach()))


@register_loss("tis")
def tis(x: LossInputs, *, tis_ratio_cap: Positive = 2.0) -> TokenLoss:
    """Truncated importance sampling: l_t = -sg(min(r, C)) A log pi, C = tis_ratio_cap."""
    weight = torch.clamp(x.ratio.detach(), max=tis_ratio_cap)
    return TokenLoss(
        -weight * x.advantages * x.logprobs,
        clipped=x.ratio.detach() > tis_ratio_cap,
        clipped_keeps_gradient=True,
    )


@register_loss("decoupled_ppo", needs_current_logprobs=lambda hp: True, before_update=_proximal)
def decoupled_ppo(
    x: LossInputs,
    *,
    clip_eps: Positive = 0.2,
    clip_eps_high: Positive | None = None,
    behavior_weight_cap: Positive | None = 2.0,
) -> TokenLoss:
    """Decoupled PPO (AReaL): PPO clip around the proximal policy, times the truncated weight pi_prox / mu.

    l_t = sg(min(pi_prox / mu, cap)) * max(-A r', -A clip(r', 1 - eps, 1 + eps_high)), r' = pi_theta / pi_prox,
    eps = clip_eps, eps_high = clip_eps_high (default clip_eps), cap = behavior_weight_cap,
    pi_prox = the trainer's log-probs recomputed just before the update (`proximal_logprobs`).
    """
    if x.proximal_logprobs is None:
        raise ValueError("decoupled_ppo: pass proximal_logprobs (the trainer's log-probs before this update)")
    prox = x.proximal_logprobs.detach()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token, clipped = _ppo_clip(x.advantages, torch.exp(x.logprobs - prox), 1 - clip_eps, 1 + high)
    weight = torch.exp(prox - x.behavior_logprobs)
    if behavior_weight_cap is not None:
        weight = torch.clamp(weight, max=behavior_weight_cap)
    return TokenLoss(
        weight * per_token, clipped=clipped, extra={"behavior_weight_mean": _masked_mean(weight, x.mask)}
    )


@register_loss("gspo", aggregation="seq-mean-token-mean")
def gspo(x: LossInputs, *, clip_eps: Positive = 3e-4, clip_eps_high: Positive = 4e-4) -> TokenLoss:
    """GSPO: sequence ratio s_i = exp(mean_t log r_it), l_t = max(-A s_it, -A clip(s_it, 1 - eps, 1 + eps_high)),
    eps = clip_eps, eps_high = clip_eps_high.

    s_it = exp(sg(log s_i) + log pi_t - sg(log pi_t)) has the value s_i and, aggregated seq-mean-token-mean
    (the default for gspo), the gradient of s_i (GSPO-token with sequence advantages).
    """
    lengths = x.mask.sum(-1, keepdim=True).clamp(min=1)
    log_seq_ratio = (x.log_ratio.detach() * x.mask).sum(-1, keepdim=True) / lengths
    seq_ratio = torch.exp(log_seq_ratio + x.logprobs - x.logprobs.detach())
    per_token, clipped = _ppo_clip(x.advantages, seq_ratio, 1 - clip_eps, 1 + clip_eps_high)
    return TokenLoss(per_token, clipped=clipped)


@register_loss("cispo")
def cispo(x: LossInputs, *, clip_eps: Positive | None = None, clip_eps_high: Positive = 0.28) -> TokenLoss:
    """CISPO (MiniMax-M1): l_t = -sg(clip(r, 1 - clip_eps, 1 + clip_eps_high)) A log pi; clip_eps None = no
    lower bound."""
    low = 0.0 if clip_eps is None else 1 - clip_eps
    r = x.ratio.detach()
    weight = torch.clamp(r, low, 1 + clip_eps_high)
    return TokenLoss(-weight * x.advantages * x.logprobs, clipped=weight != r, clipped_keeps_gradient=True)


@register_loss("topr")
def topr(x: LossInputs) -> TokenLoss:
    """TOPR (tapered off-policy REINFORCE), sequence level: l_t = -w_i A log pi.

    w_i = 1 for A >= 0 (plain REINFORCE on positive samples); w_i = sg(clip(pi(y_i) / mu(y_i), 0, 1)) for
    A < 0, with the sequence ratio pi(y_i) / mu(y_i) = exp(sum_t log r_it).
    """
    seq_ratio = torch.exp((x.log_ratio.detach() * x.mask).sum(-1, keepdim=True)).expand_as(x.logprobs)
    negative = x.advantages < 0
    weight = torch.where(negative, torch.clamp(seq_ratio, max=1.0), 1.0)
    truncated = negative & (seq_ratio > 1.0)
    return TokenLoss(-weight * x.advantages * x.logprobs, clipped=truncated, clipped_keeps_gradient=True)


if set(LOSSES) != set(get_args(LossName)):
    raise ImportError(
        f"losses: choices.LossName names {sorted(set(get_args(LossName)) - set(LOSSES))} without a loss"
    )


# ----------------------------------------------------------------------------------------- aggregation


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values.detach() * mask).sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class Reduction:
    """One aggregation mode: the sum it takes of the masked per-token losses [batch, T] (given the mask), and
    the count it divides by, from the response lengths [batch]: tokens or sequences with a response token."""

    total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count: Callable[[torch.Tensor], torch.Tensor]


def _tokens(lengths: torch.Tensor) -> torch.Tensor:
    return lengths.sum()


def _sequences(lengths: torch.Tensor) -> torch.Tensor:
    return (lengths > 0).sum()


REDUCTIONS: dict[str, Reduction] = {
    "token-mean": Reduction(lambda loss, mask: loss.sum(), _tokens),
    "seq-mean-token-mean": Reduction(
        lambda loss, mask: (loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum(), _sequences
    ),
    "seq-mean-token-sum": Reduction(lambda loss, mask: loss.sum(-1).sum(), _sequences),
}
if set(REDUCTIONS) != set(AGGREGATIONS):
    raise ImportError(f"losses: REDUCTIONS {sorted(REDUCTIONS)} are not choices.Aggregation {AGGREGATIONS}")


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float | None = None
) -> torch.Tensor:
    """Reduce [batch, T] per-token losses to a scalar.

    token-mean: sum_it l_it / N_tokens; seq-mean-token-mean: sum_i (mean_t l_it) / N_seqs;
    seq-mean-token-sum: sum_i (sum_t l_it) / N_seqs. N counts this call's tokens (sequences with at least one
    response token) unless `normalizer` gives the count over the whole optimizer mini-batch (all DP ranks and
    micro-batches): then the result is this call's share of the global mean.
    """
    if mode not in REDUCTIONS:
        raise ValueError(f"aggregate: mode must be one of {AGGREGATIONS}, got {mode!r}")
    reduction = REDUCTIONS[mode]
    total = reduction.total(torch.where(mask, per_token, 0.0), mask)
    if normalizer is not None:
        return total / normalizer
    return total / reduction.count(mask.sum(-1)).clamp(min=1)


# ----------------------------------------------------------------------------------------- the wrapper


class PolicyLoss:
    """A configured loss: `(logprobs, behavior_logprobs, advantages, response_mask, **optional) -> (loss, metrics)`.

    Tensors are [batch, response_len]; advantages per token. Optional keyword arguments:
    proximal_logprobs (decoupled_ppo), engine_logprobs (corrections with trainer behaviour), staleness (metrics only),
    m2_threshold (m2po, global scope), normalizer (see `aggregate`), process_group (the data-parallel group).
    Positions outside response_mask are ignored, whatever they hold (NaN padding included).
    Non-finite logprobs inside the mask always raise: a NaN in the trainer's own forward poisons the
    gradient upstream whether or not the token is masked. Non-finite behaviour / engine / proximal log-probs
    or advantages raise too by default (`nonfinite="raise"`); with `nonfinite="mask"` those tokens are
    dropped from the loss and its token count and counted in `loss/nonfinite_tokens`.
    """

    def __init__(
        self,
        name: str,
        *,
        aggregation: Aggregation | None = None,
        corrections: Sequence[str] = (),
        behavior_logprobs: BehaviorSource = "engine",
        nonfinite: NonFinite = "raise",
        **hyperparameters,
    ):
        self.spec = LOSSES[name]
        self.name, self.fn = name, self.spec.fn
        thresholds = correction_hyperparameters()
        self.correction_settings = {k: v for k, v in hyperparameters.items() if k in thresholds}
        bound = inspect.signature(self.fn).bind(
            None, **{k: v for k, v in hyperparameters.items() if k not in thresholds}
        )
        bound.apply_defaults()
        # every hyperparameter the loss receives, its defaults included
        self.hyperparameters: dict[str, Any] = dict(list(bound.arguments.items())[1:])
        self.aggregation = aggregation or self.spec.aggregation
        self.corrections, self.behavior_logprobs = tuple(corrections), behavior_logprobs
        self.nonfinite = nonfinite
        for correction in self.corrections:
            if correction not in CORRECTIONS:
                raise ValueError(
                    f"{name}: unknown rollout correction {correction!r}; choose from {sorted(CORRECTIONS)}"
                )
            if CORRECTIONS[correction].weights and behavior_logprobs != "trainer":
                raise ValueError(
                    f"{name}: rollout correction {correction!r} weights the loss by mu_trainer / mu_engine, which "
                    "needs behavior_logprobs='trainer'; with the engine's log-probs as behaviour the loss's ratio "
                    "already divides by mu_engine (use a masking rule: icepop, seq_geo_mask, seq_product_mask)"
                )
        if len(set(self.corrections)) != len(self.corrections):
            raise ValueError(f"{name}: a rollout correction is listed twice in {list(self.corrections)}")
        check_thresholds(self.corrections, self.correction_settings)

    @classmethod
    def from_config(cls, algorithm: Any, behavior_logprobs: BehaviorSource = "engine") -> PolicyLoss:
        """The loss `algorithm.loss`, each of its hyperparameters read from the `algorithm` key of that name.

        A key left None (and `algorithm.aggregation` "auto") keeps the loss's own default; the rollout
        corrections `algorithm.rollout_corrections` read their thresholds the same way. `behavior_logprobs`:
        `rollout.behavior_logprobs`, what the corrections compare.
        """
        keys = [*LOSSES[algorithm.loss].hyperparameters]
        for correction in algorithm.rollout_corrections:
            keys += CORRECTIONS[correction].hyperparameters if correction in CORRECTIONS else []
        settings = {key: getattr(algorithm, key) for key in keys}
        aggregation = None if algorithm.aggregation == "auto" else algorithm.aggregation
        return get_loss(
            algorithm.loss,
            corrections=tuple(algorithm.rollout_corrections),
            behavior_logprobs=behavior_logprobs,
            **_given(aggregation=aggregation, **settings),
        )

    @property
    def needs_current_logprobs(self) -> bool:
        """Whether the trainer must compute log pi_theta of the whole mini-batch (no grad) before the update
        and pass it to `inputs_before_update` (m2po's global threshold, decoupled_ppo's proximal policy)."""
        return self.spec.needs_current_logprobs(self.hyperparameters)

    def inputs_before_update(self, current: CurrentLogprobs) -> list[dict[str, Any]]:
        """The extra keyword arguments of each micro-batch's call, from the mini-batch's current log-probs.

        Collective over `current.process_group` for m2po (every DP rank calls it). The response masks it
        passes on are those the rollout corrections keep, so m2po's threshold covers the tokens its loss sees."""
        if not self.needs_current_logprobs:
            raise ValueError(f"{self.name}: needs no current log-probs before the update")
        if self.corrections:
            engine = current.engine_logprobs or [None] * len(current.logprobs)
            kept = [
                self.corrected_mask(lp, blp, m.bool(), e)
                for lp, blp, m, e in zip(
                    current.logprobs, current.behavior_logprobs, current.response_mask, engine
                )
            ]
            current = dataclasses.replace(current, response_mask=kept)
        return self.spec.before_update(self.hyperparameters, current)

    def _log_rho(self, logprobs, behavior_logprobs, engine_logprobs) -> torch.Tensor:
        """The corrections' log rho: log mu_trainer - log mu_engine (trainer behaviour), else log pi_old -
        log mu_engine (`logprobs` are the current policy's before the update, detached)."""
        if self.needs_engine_logprobs:
            if engine_logprobs is None:
                raise ValueError(
                    f"{self.name}: rollout corrections {list(self.corrections)} with behavior_logprobs='trainer' "
                    "need engine_logprobs (the engine's sampling log-probs)"
                )
            return behavior_logprobs - engine_logprobs
        return logprobs.detach() - behavior_logprobs

    def corrected_mask(self, logprobs, behavior_logprobs, mask, engine_logprobs=None) -> torch.Tensor:
        """The tokens of `mask` that every rollout correction keeps."""
        log_rho = self._log_rho(logprobs.float(), behavior_logprobs.float(), engine_logprobs)
        keep, _, _ = apply_corrections(self.corrections, self.correction_settings, log_rho, mask)
        return keep

    def normalizer_count(self, response_lengths: Sequence[int]) -> int:
        """What this loss's aggregation divides by, over responses of these lengths: their tokens
        (token-mean) or those with a response token (the seq-mean modes). The trainer's `normalizer` is this
        count over the whole optimizer mini-batch."""
        return int(REDUCTIONS[self.aggregation].count(torch.as_tensor(response_lengths, dtype=torch.long)))

    @property
    def needs_engine_logprobs(self) -> bool:
        """Whether each call needs `engine_logprobs`: rollout corrections against trainer-side behaviour."""
        return bool(self.corrections) and self.behavior_logprobs == "trainer"

    def __repr__(self) -> str:
        return (
            f"PolicyLoss({self.name!r}, aggregation={self.aggregation!r}, corrections={list(self.corrections)}, "
            f"behavior_logprobs={self.behavior_logprobs!r}, {self.hyperparameters}, {self.correction_settings})"
        )

    def __call__(
        self,
        logprobs: torch.Tensor,
        behavior_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        proximal_logprobs: torch.Tensor | None = None,
        engine_logprobs: torch.Tensor | None = None,
        staleness: torch.Tensor | None = None,
        m2_threshold: float | None = None,
        normalizer: float | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        tensors = dict(
            logprobs=logprobs,
            behavior_logprobs=behavior_logprobs,
            advantages=advantages,
            response_mask=response_mask,
            proximal_logprobs=proximal_logprobs,
            engine_logprobs=engine_logprobs,
            staleness=staleness,
        )
        self._check_shapes(tensors)
        if normalizer is not None and not normalizer > 0:
            raise ValueError(f"{self.name}: normalizer must be > 0, got {normalizer}")
        mask = response_mask.bool()
        mask, n_nonfinite = self._check_finite(tensors, mask)

        dtype = torch.promote_types(logprobs.dtype, torch.float32)

        def clean(t):
            return None if t is None else torch.where(mask, t.to(dtype), 0.0)

        lp, blp, adv = clean(logprobs), clean(behavior_logprobs), clean(advantages)
        keep, weight, extra = mask, None, {}
        if self.corrections:  # before the loss: the tokens they drop enter neither T nor the M2 budget
            log_rho = self._log_rho(lp, blp, clean(engine_logprobs))
            keep, weight, extra = apply_corrections(self.corrections, self.correction_settings, log_rho, mask)
        log_ratio = lp - blp
        ratio = torch.exp(log_ratio)
        inputs = LossInputs(
            logprobs=lp,
            behavior_logprobs=blp,
            advantages=adv,
            mask=keep,
            log_ratio=log_ratio,
            ratio=ratio,
            trust_region=trust_region_mask(log_ratio.detach(), adv, keep, ratio=ratio.detach()),
            proximal_logprobs=clean(proximal_logprobs),
            m2_threshold=m2_threshold,
            process_group=process_group,
        )
        out = self.fn(inputs, **self.hyperparameters)
        per_token = out.per_token if weight is None else out.per_token * weight
        extra.update(out.extra)
        # dropped tokens still count in the normaliser, as the M2 mask's: the step size does not grow with them
        loss = aggregate(torch.where(keep, per_token, 0.0), mask, self.aggregation, normalizer)
        extra["nonfinite_tokens"] = float(n_nonfinite)
        metrics = policy_metrics(inputs, out, staleness=staleness, extra=extra)
        return loss, metrics

    def _check_shapes(self, tensors: dict[str, torch.Tensor | None]) -> None:
        shape = tensors["logprobs"].shape
        if len(shape) != 2:
            raise ValueError(f"{self.name}: logprobs must be [batch, response_len], got shape {tuple(shape)}")
        for key, t in tensors.items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.name}: {key} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != shape:
                raise ValueError(
                    f"{self.name}: {key} has shape {tuple(t.shape)}, logprobs has {tuple(shape)}"
                )
            if key not in ("response_mask", "staleness") and not t.is_floating_point():
                raise TypeError(f"{self.name}: {key} must be floating point, got {t.dtype}")

    def _check_finite(
        self, tensors: dict[str, torch.Tensor | None], mask: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        bad_any = torch.zeros_like(mask)
        keys = [
            k
            for k in (
                "logprobs",
                "behavior_logprobs",
                "advantages",
                "proximal_logprobs",
                "engine_logprobs",
            )
            if tensors[k] is not None
        ]
        # one fast pass and one host sync in the common case: every sum finite means every value finite
        sums = torch.stack([tensors[k].detach().sum(dtype=torch.float64) for k in keys]).tolist()
        for key, total in zip(keys, sums):
            if math.isfinite(total):
                continue
            bad = mask & ~torch.isfinite(tensors[key].detach())
            if bool(bad.any()):
                if key == "logprobs" or self.nonfinite == "raise":
                    first = tuple(torch.nonzero(bad)[0].tolist())
                    raise ValueError(
                        f"{self.name}: {key} has {int(bad.sum())} non-finite values in the response mask, "
                        f"first at {first}"
                    )
                bad_any |= bad
        return mask & ~bad_any, int(bad_any.sum())


def get_loss(name: str, **hyperparameters) -> PolicyLoss:
    """The loss `name` (one of LOSSES) with its hyperparameters checked against the loss's signature.

    Common to every loss (`PolicyLoss`'s own keywords): aggregation ("token-mean" | "seq-mean-token-mean" |
    "seq-mean-token-sum"), corrections (rollout corrections, in order; their thresholds by name, e.g.
    engine_mismatch_tis_cap for token_tis), behavior_logprobs ("engine" | "trainer": what the behaviour
    log-probs are, so what the corrections compare), nonfinite ("raise" | "mask").
    """
    if name not in LOSSES:
        raise ValueError(f"get_loss: unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    takes = {
        **LOSSES[name].hyperparameters,
        **correction_hyperparameters(),
        **keyword_parameters(PolicyLoss.__init__),
    }
    unknown = sorted(set(hyperparameters) - set(takes))
    if unknown:
        raise ValueError(f"get_loss({name!r}): unknown hyperparameters {unknown}; {name} takes {list(takes)}")
    for key, value in hyperparameters.items():
        try:
            check(key, value, takes[key].annotation)
        except ValueError as e:
            raise ValueError(f"get_loss({name!r}): {e}") from None
    return PolicyLoss(name, **hyperparameters)
