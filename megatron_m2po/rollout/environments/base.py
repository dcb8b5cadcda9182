"""What an environment is to the rollout manager: a prompt in, a group of scored samples out.

The manager owns prompts, admission and the queue; the environment owns how a prompt becomes responses
(one model turn, or model turns alternating with tool results) and how they are scored. So a new task is a
new environment, and the manager, the queue and the trainer stay as they are.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from megatron_m2po.config import ConfigError
from megatron_m2po.data.prompts import Prompt
from megatron_m2po.types import Sample, SamplingParams


@dataclasses.dataclass
class NoSettings:
    """An environment without settings of its own: any key under `rollout.env_settings` is refused."""


class Environment(ABC):
    """Turns one prompt into `n` samples with `Sample.reward` and `Sample.response_text` set.

    `Settings` is the dataclass of the environment's own settings (`rollout.env_settings` in the config),
    checked by `parse_settings` when the rollout side is built."""

    name: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    uses_sandbox: ClassVar[bool] = False  # built with `sandbox=` (the config's sandbox section)
    # A sample spans several model turns with environment tokens between them (`Sample.loss_mask`); held-out
    # evaluation then runs through the environment (`for_evaluation`), not as one engine call per prompt.
    multi_turn: ClassVar[bool] = False

    @classmethod
    def prompt_extra_tokens(cls, tokenizer, settings) -> tuple[str, int]:
        """(what, tokens) the environment adds to every prompt beyond `data.max_prompt_tokens`'s count
        (tool_math: the tool's schema in the chat template): the micro-batch token budget must hold it."""
        return "", 0

    @abstractmethod
    async def rollout(self, prompt: Prompt, n: int) -> list[Sample]:
        """`n` scored samples for `prompt`; errors from the engines propagate (the manager counts them)."""

    def for_evaluation(self, sampling: SamplingParams) -> Environment:
        """The environment as held-out evaluation uses it: `sampling` (greedy), the same engines, rewards and
        tools, counters of its own (its `metrics` describe the evaluation alone) and no reward shaping, so
        a correct answer is the reward function's full score."""
        raise NotImplementedError(f"rollout.env={self.name}: no held-out evaluation through the environment")

    def metrics(self) -> dict[str, float]:
        """The environment's own scalars (`env/...`, tool pool counts), beside the manager's."""
        return {}

    async def close(self) -> None:
        """Release what the environment holds (tool pools); the engines and reward pool belong to others."""
        return None

    @classmethod
    def parse_settings(cls, raw: dict[str, Any] | None) -> Any:
        """`rollout.env_settings` as this environment's `Settings`; an unknown or mistyped key is named."""
        raw = dict(raw or {})
        fields = {f.name: f for f in dataclasses.fields(cls.Settings)}
        for key in raw:
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise ConfigError(
                    f"'rollout.env_settings.{key}': not a setting of rollout.env={cls.name} (its settings: {known})"
                )
        try:
            return cls.Settings(**raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"'rollout.env_settings' for rollout.env={cls.name}: {e}") from e
