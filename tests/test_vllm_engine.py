"""vLLM engine (runs where the [vllm] extra is installed): log-probs vs HF recompute, in-place weight update."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from megatron_m2po.models.tiny import make_tiny_model  # noqa: E402
from megatron_m2po.rollout.engines.local import LocalEngine  # noqa: E402
from megatron_m2po.rollout.engines.vllm import VLLMEngine  # noqa: E402
from megatron_m2po.types import SamplingParams  # noqa: E402


def recompute(model, s, temperature):
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(s.prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)


def test_vllm_logprobs_and_weight_update(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM's CPU attention kernels need head_dim >= 32 (16, the tiny default, is rejected)
    hf_dir = make_tiny_model(
        "qwen3",
        tmp_path / "m",
        seed=5,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
    )
    engine = VLLMEngine(hf_dir, dtype="float32", gpu_memory_utilization=0.2)
    reference = LocalEngine(hf_dir)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3)

    async def run():
        before = await engine.generate("p", [40, 41, 42], 2, params)
        new = {k: v + 0.05 * torch.randn_like(v) for k, v in reference.state_dict().items()}
        await engine.update_weights(new.items(), version=1)
        reference.load_tensors(new.items())
        after = await engine.generate("p", [40, 41, 42], 2, params)
        return before, after

    before, after = asyncio.run(run())
    for s in before + after:
        assert len(s.response_ids) == len(s.behavior_logprobs) > 0
    for s in after:
        assert s.versions == [1] * len(s.response_ids)
        assert torch.allclose(
            torch.tensor(s.behavior_logprobs), recompute(reference.model, s, 0.8), atol=1e-5, rtol=0
        )
