"""GPU-only paths: NCCL init, bf16 forward parity, Transformer Engine layer spec, GPU checkpoint round trip.

Run on an H100 with `python -m pytest -q -m gpu tests/test_gpu.py`; skipped without CUDA (conftest).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_m2po import platform
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.models import forward_logits, load_hf_config
from megatron_m2po.models.tiny import make_tiny_model

pytestmark = pytest.mark.gpu
ARCHS = ("qwen3", "qwen2", "llama")


@pytest.fixture()
def nccl():
    platform.init_distributed()
    yield
    platform.destroy_distributed()


def reference_logits(hf_dir, input_ids: torch.Tensor) -> torch.Tensor:
    model = (
        AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        .cuda()
        .eval()
    )
    with torch.no_grad():
        return model(input_ids).logits.float()


def test_platform_picks_gpu_path(nccl):
    assert platform.on_gpu() and platform.dist_backend() == "nccl"
    assert platform.default_dtype() == torch.bfloat16
    assert torch.distributed.get_backend() == "nccl"
    x = torch.ones(4, device=platform.device())
    torch.distributed.all_reduce(x)
    assert x.device.type == "cuda" and x.sum().item() == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_parity_on_gpu(tmp_path, nccl, arch):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf_dir = make_tiny_model(arch, tmp_path / arch, seed=3)
    ids = torch.randint(0, load_hf_config(hf_dir).vocab_size, (2, 64), device="cuda")
    model = load_policy(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = forward_logits(model, ids).float()
    assert (ours - reference_logits(hf_dir, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_parity_on_gpu(tmp_path, nccl, arch):
    hf_dir = make_tiny_model(arch, tmp_path / arch, seed=3)
    ids = torch.randint(0, load_hf_config(hf_dir).vocab_size, (2, 64), device="cuda")
    model = load_policy(hf_dir).eval()  # bf16 by default on GPU
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ours = forward_logits(model, ids).float()
    reference = reference_logits(hf_dir, ids)
    # bf16 has an 8-bit mantissa: compare relative to the logits' scale
    assert (ours - reference).abs().max().item() <= 0.03 * reference.abs().max().item() + 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_transformer_engine_spec(tmp_path, nccl, arch):
    pytest.importorskip("transformer_engine.pytorch")
    from megatron_m2po.checkpoint import iter_hf_tensors
    from megatron_m2po.checkpoint.hf_io import HFSafetensorsReader

    hf_dir = make_tiny_model(arch, tmp_path / arch, seed=3)
    model = load_policy(hf_dir).eval()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names), "TE spec (fused norms) not used"
    ids = torch.randint(0, load_hf_config(hf_dir).vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ours = forward_logits(model, ids).float()
    reference = reference_logits(hf_dir, ids)
    assert (ours - reference).abs().max().item() <= 0.03 * reference.abs().max().item() + 1e-3
    with HFSafetensorsReader(hf_dir) as reader:
        for name, tensor in iter_hf_tensors(model, load_hf_config(hf_dir)):
            expected = reader.read(name).to(torch.bfloat16)
            assert torch.equal(tensor.cpu(), expected), name


def test_megatron_checkpoint_round_trip_on_gpu(tmp_path, nccl):
    from megatron_m2po.checkpoint import export_hf_dir_collective, save_model_checkpoint
    from megatron_m2po.checkpoint.hf_io import HFSafetensorsReader

    hf_dir = make_tiny_model("qwen3", tmp_path / "hf", seed=3)
    model = load_policy(hf_dir)
    save_model_checkpoint(model, tmp_path / "ckpt", hf_source_dir=hf_dir, hf_config=load_hf_config(hf_dir))
    again = load_policy(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    export_hf_dir_collective(again, load_hf_config(hf_dir), tmp_path / "export", source_dir=tmp_path / "ckpt")
    with HFSafetensorsReader(hf_dir) as original, HFSafetensorsReader(tmp_path / "export") as exported:
        for name in original.names():  # bf16 on GPU: the export equals the bf16-rounded original
            assert torch.equal(exported.read(name), original.read(name).to(torch.bfloat16)), name
