"""The Megatron policy equals transformers' own Qwen3 / Qwen2 / Llama on tiny random configs (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_m2po import platform
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.models import forward_logits, load_hf_config
from megatron_m2po.models.tiny import make_tiny_model

CASES = {
    # family defaults: qwen3 q/k norms + explicit head_dim (q width 64 = hidden), qwen2 qkv bias,
    # llama llama3 rope scaling (original_max_position_embeddings 1024 != megatron's fixed 8192) + tied embeddings
    "qwen3": ("qwen3", {}),
    "qwen3-wide-heads-tied": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "llama": ("llama", {}),
    "llama-untied-3.1-rope": (
        "llama",
        {
            "tie_word_embeddings": False,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 16384,
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, single_process, case):
    arch, overrides = CASES[case]
    hf_dir = make_tiny_model(arch, tmp_path / case, seed=7, **overrides)
    config = load_hf_config(hf_dir)
    model = load_policy(hf_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    # long enough that llama3's scaled low frequencies and every position matter
    input_ids = torch.randint(0, config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_logits(model, input_ids)
        theirs = reference(input_ids).logits
    assert ours.shape == theirs.shape == (2, 96, config.vocab_size)
    assert theirs.abs().max() > 0.05  # the comparison is not between two near-zero tensors
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_init_destroy_repeatable_and_shims_idempotent():
    for tp in (1, 1):
        platform.init_distributed(tensor_parallel=tp)
        platform.apply_cpu_shims()
        from megatron.core import parallel_state

        assert parallel_state.get_tensor_model_parallel_world_size() == tp
        platform.destroy_distributed()
    assert not torch.distributed.is_initialized()


def test_platform_facts_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU facts")
    assert platform.dist_backend() == "gloo"
    assert platform.default_dtype() == torch.float32
    assert platform.device() == torch.device("cpu")
    assert not platform.has_transformer_engine()
