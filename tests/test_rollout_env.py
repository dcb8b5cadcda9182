"""Environments: `rollout.env` picks how a prompt becomes scored samples; the math environment is the
single-turn task exactly (the same token ids, log-probs, versions and rewards as a direct engine call)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
import torch
from transformers import AutoTokenizer

from megatron_m2po.config import Config, ConfigError, load_config
from megatron_m2po.data.prompts import PromptDataset
from megatron_m2po.event_loop import LoopThread
from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout import build
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.environments import ENVIRONMENTS, SingleTurnMath, environment_class
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.rollout.manager import RolloutManager
from megatron_m2po.rollout.rewards import RewardPool
from megatron_m2po.types import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)
PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("env")
    hf_dir = make_tiny_model("qwen3", root / "model", seed=4)
    data = root / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(6))
    )
    pool = RewardPool("rewards_helpers:length_parity_reward", workers=1, timeout=10)
    yield hf_dir, data, pool
    pool.close()


def test_math_environment_gives_the_direct_engine_call_and_its_rewards(setup):
    """The manager through `rollout.env=math` vs. the same seeded engine called directly and scored by hand."""
    hf_dir, data, pool = setup
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg = Config()
    dataset = PromptDataset(data, tok, seed=0)
    farm = EngineFarm([LocalEngine(hf_dir, engine_id="e0", seed=0)])
    env = build.environment(cfg, farm, pool, tok, PARAMS)
    assert isinstance(env, SingleTurnMath)
    manager = RolloutManager(
        dataset, farm, pool, None, responses_per_prompt=3, sampling=PARAMS, environment=env
    )
    try:
        groups = manager.generate_batch(2, version=0)
    finally:
        manager.stop()

    reference = EngineFarm([LocalEngine(hf_dir, engine_id="e0", seed=0)])
    loop = LoopThread("reference")

    async def direct_calls():  # concurrently, as the manager made them: the engine batches them alike
        return await asyncio.gather(
            *(reference.generate(g.prompt_id, g.prompt_ids, 3, PARAMS) for g in groups)
        )

    try:
        for group, direct in zip(groups, loop.run(direct_calls())):
            texts = [tok.decode(s.response_ids, skip_special_tokens=True) for s in direct]
            rewards = pool.score(texts, [group.answer] * 3)
            assert [s.response_ids for s in group.samples] == [s.response_ids for s in direct]
            # the same tokens, but the engine's batches may be cut differently under load (other matmul shapes)
            for mine, theirs in zip(group.samples, direct):
                torch.testing.assert_close(
                    torch.tensor(mine.behavior_logprobs), torch.tensor(theirs.behavior_logprobs), rtol=0, atol=1e-5
                )
            assert [s.versions for s in group.samples] == [s.versions for s in direct]
            assert [s.response_text for s in group.samples] == texts
            assert group.rewards == [float(r) for r in rewards]
    finally:
        loop.run(reference.close())
        loop.stop()


def test_env_is_chosen_by_name_and_its_settings_are_checked(tmp_path):
    assert set(ENVIRONMENTS) == {"math", "tool_math"} and environment_class("math") is SingleTurnMath
    with pytest.raises(ValueError, match="'rollout.env': unknown environment 'chess'"):
        environment_class("chess")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {path: /models/tiny}\ndata: {path: /data/train.jsonl}\n"
        "rollout:\n  env: math\n  env_settings: {max_turns: 3}\n"
    )
    cfg = load_config(recipe, [])
    assert cfg.rollout.env_settings == {"max_turns": 3}
    with pytest.raises(
        ConfigError, match=r"'rollout.env_settings.max_turns': not a setting of rollout.env=math"
    ):
        SingleTurnMath.parse_settings(cfg.rollout.env_settings)
    with pytest.raises(ConfigError, match="'rollout.env'"):
        load_config(recipe, ["rollout.env=chess"])
    with pytest.raises(ConfigError, match="'rollout.env_settings': expected a mapping"):
        load_config(recipe, ["rollout.env_settings=[1, 2]"])
