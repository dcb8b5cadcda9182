"""Vocab-parallel log-probs, advantage estimators, M2PO and the baseline losses, their diagnostics."""

from megatron_m2po.algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from megatron_m2po.algorithms.logprobs import vocab_parallel_logprobs
from megatron_m2po.algorithms.losses import (
    AGGREGATIONS,
    LOSSES,
    CurrentLogprobs,
    PolicyLoss,
    aggregate,
    get_loss,
    register_loss,
)
from megatron_m2po.algorithms.m2po_mask import compute_m2_threshold, trust_region_mask, water_filling_tau
from megatron_m2po.algorithms.overlong import soft_overlong_penalty

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "LOSSES",
    "CurrentLogprobs",
    "PolicyLoss",
    "aggregate",
    "compute_advantages",
    "compute_m2_threshold",
    "get_loss",
    "register_loss",
    "soft_overlong_penalty",
    "trust_region_mask",
    "vocab_parallel_logprobs",
    "water_filling_tau",
]
