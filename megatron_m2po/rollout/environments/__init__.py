"""Environments: how a prompt becomes scored samples (`rollout.env` picks one, docs/rollout.md)."""

from __future__ import annotations

from typing import get_args

from megatron_m2po.choices import EnvName, MultiTurnEnvName
from megatron_m2po.config import ENV_RESPONSE_BUDGET
from megatron_m2po.rollout.environments.base import Environment
from megatron_m2po.rollout.environments.single_turn_math import SingleTurnMath
from megatron_m2po.rollout.environments.tool_math import ToolMath

ENVIRONMENTS: dict[str, type[Environment]] = {cls.name: cls for cls in (SingleTurnMath, ToolMath)}
if set(ENVIRONMENTS) != set(get_args(EnvName)):
    raise ImportError(f"environments {sorted(ENVIRONMENTS)} do not match choices.EnvName {get_args(EnvName)}")
_MULTI_TURN = {name for name, cls in ENVIRONMENTS.items() if cls.multi_turn}
if _MULTI_TURN != set(get_args(MultiTurnEnvName)) or not _MULTI_TURN <= set(ENV_RESPONSE_BUDGET):
    raise ImportError(
        f"multi-turn environments {sorted(_MULTI_TURN)}: each needs its name in choices.MultiTurnEnvName and "
        "its response budget in config.ENV_RESPONSE_BUDGET"
    )


def environment_class(name: str) -> type[Environment]:
    try:
        return ENVIRONMENTS[name]
    except KeyError:
        raise ValueError(
            f"'rollout.env': unknown environment {name!r} (known: {sorted(ENVIRONMENTS)})"
        ) from None


__all__ = ["ENVIRONMENTS", "Environment", "SingleTurnMath", "ToolMath", "environment_class"]
