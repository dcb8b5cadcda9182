"""Rewards: math-verify answer checking and a process pool that scores with a per-sample timeout."""

from megatron_m2po.rollout.rewards.math_answer import math_reward, math_reward_with_format
from megatron_m2po.rollout.rewards.pool import DEFAULT_REWARD, RewardPool, load_reward_fn

__all__ = [
    "DEFAULT_REWARD",
    "RewardPool",
    "load_reward_fn",
    "math_reward",
    "math_reward_with_format",
]
