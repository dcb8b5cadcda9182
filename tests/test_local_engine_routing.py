"""The local engine's routed experts: what transformers' Qwen3-MoE routes the same tokens to in one full
forward, for prompt and response, in batched decoding with left padding."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.types import SamplingParams
from tests.moe_reference import hf_routed_experts, router_margins


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("moe"), seed=11)


def test_samples_carry_the_experts_a_full_forward_routes_to(moe_dir):
    engine = LocalEngine(moe_dir, record_routing=True, max_batch_rows=8)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    prompts = {"short": [5, 9, 17], "long": list(range(20, 31))}

    async def run():
        try:
            return await asyncio.gather(*(engine.generate(k, p, 2, params) for k, p in prompts.items()))
        finally:
            await engine.close()

    config = engine.model.config
    checked = total = 0
    for samples in asyncio.run(run()):
        for s in samples:
            fed = s.prompt_ids + s.response_ids[:-1]
            assert s.routed_experts.dtype == np.uint8
            assert s.routed_experts.shape == (len(fed), config.num_hidden_layers, config.num_experts_per_tok)
            with torch.no_grad():
                out = engine.model(torch.tensor([fed]), output_router_logits=True)
            full = hf_routed_experts(out.router_logits, config.num_experts_per_tok, batch=1)[0]
            clear = (
                torch.stack([router_margins(r, config.num_experts_per_tok) for r in out.router_logits], 1)
                > 1e-4
            )
            ours = torch.from_numpy(s.routed_experts.astype(np.int64)).sort(-1).values
            assert torch.equal(ours[clear], full.sort(-1).values[clear])
            checked, total = checked + int(clear.sum()), total + clear.numel()
    assert checked > 0.9 * total  # near-ties (margin <= 1e-4) may flip between cached and full forwards


def test_dense_models_and_recording_off(tmp_path, moe_dir):
    with pytest.raises(ValueError, match="routed experts are recorded for MoE models"):
        LocalEngine(make_tiny_model("qwen3", tmp_path, seed=0), record_routing=True)
    engine = LocalEngine(moe_dir)
    try:
        (sample,) = asyncio.run(engine.generate("p", [5, 6], 1, SamplingParams(max_new_tokens=3, seed=1)))
    finally:
        asyncio.run(engine.close())
    assert sample.routed_experts is None
