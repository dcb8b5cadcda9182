"""Qwen3-MoE on GPUs: Transformer Engine's grouped GEMM and the alltoall dispatcher, equal to transformers.

    python -m pytest -q -m gpu tests/test_moe_gpu.py     # (tools/gpu_checks.sh runs it)

One GPU: EP = 1 with every expert in one grouped GEMM, with and without routing replay. Two GPUs: EP = 2
under torchrun (NCCL), the same checks as the CPU parity test (tests/dist/moe_parallel_parity.py),
gradients, routing and routing replay included.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_m2po import platform
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.models import forward_logits, load_hf_config, unwrap_model
from megatron_m2po.models.tiny import make_tiny_model
from tests.conftest import REPO, free_port, subprocess_env
from tests.moe_reference import assert_clear_margins, hf_topk_masks, megatron_routing

pytestmark = pytest.mark.gpu


@pytest.fixture()
def nccl():
    platform.init_distributed()
    yield
    platform.destroy_distributed()


def test_grouped_gemm_and_alltoall_match_transformers(tmp_path, nccl):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", seed=11)
    config = load_hf_config(hf_dir)
    model = load_policy(hf_dir, dtype=torch.float32).eval()
    moe = unwrap_model(model).decoder.layers[0].mlp
    assert type(moe.experts).__name__ == "TEGroupedMLP" and model.config.moe_grouped_gemm
    assert isinstance(moe.token_dispatcher, MoEAlltoAllTokenDispatcher)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    ids = torch.randint(1, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad(), megatron_routing(model) as seen:
        ours = forward_logits(model, ids).float()
        theirs = reference(ids, output_router_logits=True)
    assert_clear_margins(theirs.router_logits, config.num_experts_per_tok)
    assert (ours - theirs.logits).abs().max().item() <= 1e-3
    masks = hf_topk_masks(theirs.router_logits, config.num_experts_per_tok, batch=2)
    for layer, (routing_map,) in seen.items():
        assert torch.equal(routing_map, masks[layer].reshape(-1, config.num_experts)), layer


def test_grouped_gemm_and_alltoall_replay_the_engines_routing(tmp_path, nccl):
    """Routing replay on the GPU path (TE grouped GEMM, alltoall dispatcher): with the routers replaying random
    expert choices, every router dispatches to exactly them and the logits equal transformers' forced to the
    same experts; forward and backward under replay, then the model routes on its own again."""
    from megatron_m2po.models.routing_replay import replayed_routing
    from tests.moe_reference import hf_forced_routing

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", seed=11)
    config = load_hf_config(hf_dir)
    layers, k, b, s = config.num_hidden_layers, config.num_experts_per_tok, 2, 48
    model = load_policy(hf_dir, dtype=torch.float32, routing_replay=True)
    assert type(unwrap_model(model).decoder.layers[0].mlp.experts).__name__ == "TEGroupedMLP"
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, config.vocab_size, (b, s), generator=g).cuda()
    routed = torch.stack([torch.randperm(config.num_experts, generator=g)[:k] for _ in range(b * s * layers)])
    routed = routed.reshape(b, s, layers, k).cuda()
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad(), hf_forced_routing(reference, routed):
        forced = reference(ids).logits
    with megatron_routing(model) as seen, replayed_routing(model, routed):
        ours = forward_logits(model, ids).float()
        ours.logsumexp(-1).sum().backward()
    assert (ours.detach() - forced).abs().max().item() <= 1e-3
    for layer, (routing_map,) in seen.items():
        chosen = routing_map.nonzero()[:, 1].reshape(-1, k).sort(-1).values
        expected = routed[:, :, layer].transpose(0, 1).reshape(-1, k).sort(-1).values
        assert torch.equal(chosen, expected), layer
    router_grads = [p.grad for name, p in model.named_parameters() if name.endswith("router.weight")]
    assert len(router_grads) == layers
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in router_grads)
    with torch.no_grad():
        free = forward_logits(model, ids).float()
    assert (free - forced).abs().max().item() > 1e-2  # replay ended with the block


def test_bf16_moe_update_runs(tmp_path, nccl):
    """The trainer's bf16 path through grouped GEMM: forward, backward, gradients on every expert."""
    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", seed=2)
    model = load_policy(hf_dir).train()
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(1, 320, (4, 64), device="cuda")
    forward_logits(model, ids).float().logsumexp(-1).mean().backward()
    experts = unwrap_model(model).decoder.layers[0].mlp.experts
    grads = [p.grad for name, p in experts.named_parameters() if "linear_fc1" in name]
    assert len(grads) == 8 and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="EP = 2 needs two GPUs")
def test_expert_parallel_alltoall_on_two_gpus(tmp_path):
    import subprocess
    import sys

    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", seed=11)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
        str(REPO / "tests" / "dist" / "moe_parallel_parity.py"), "ep", str(hf_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.stdout.count("ep: logits, 69 gradients") == 2
    # routing replay through the alltoall dispatcher and grouped GEMM: logits of transformers forced to it
    assert proc.stdout.count("replayed routing of 24 tokens gives its logits") == 2
