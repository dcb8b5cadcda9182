"""One model turn per sample, scored by the reward function on the decoded response (the paper's math task)."""

from __future__ import annotations

from megatron_m2po.data.prompts import Prompt
from megatron_m2po.rollout.environments.base import Environment
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.types import Sample, SamplingParams


class SingleTurnMath(Environment):
    """The n samples of a prompt are one farm request (one engine call with n, as the engines batch them),
    then scored together in the reward pool against the prompt's answer."""

    name = "math"

    def __init__(self, farm: EngineFarm, reward_pool, tokenizer, sampling: SamplingParams, settings=None):
        self.farm, self.reward_pool, self.tokenizer, self.sampling = farm, reward_pool, tokenizer, sampling
        self.settings = settings if settings is not None else self.parse_settings(None)

    async def rollout(self, prompt: Prompt, n: int) -> list[Sample]:
        samples = await self.farm.generate(prompt.prompt_id, prompt.prompt_ids, n, self.sampling)
        texts = [
            s.response_text or self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
            for s in samples
        ]
        rewards = await self.reward_pool.score_async(texts, [prompt.answer] * len(samples))
        for sample, text, reward in zip(samples, texts, rewards):
            sample.response_text, sample.reward = text, float(reward)
        return samples
