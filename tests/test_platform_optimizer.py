"""On CPU the shims let Megatron DDP + get_megatron_optimizer clip gradients by the true global norm."""

from __future__ import annotations

import pytest
import torch

from megatron_m2po import platform
from megatron_m2po.models import build_model, load_hf_config
from megatron_m2po.models.tiny import make_tiny_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="exercises the CPU shims")
def test_megatron_optimizer_clips_by_global_norm_on_cpu(tmp_path):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    torch.set_num_threads(1)
    hf_dir = make_tiny_model("qwen3", tmp_path / "m", num_hidden_layers=1)
    platform.init_distributed()
    try:
        model = build_model(load_hf_config(hf_dir))
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.01, bf16=False, fp16=False), [ddp]
        )
        ids = torch.randint(0, 320, (2, 8))
        logits = ddp(ids, torch.arange(8).expand(2, 8), None)
        (logits.float() ** 2).mean().backward()
        ddp.finish_grad_sync()
        expected_norm = torch.sqrt(sum((p.main_grad.float() ** 2).sum() for p in model.parameters())).item()
        before = [p.detach().clone() for p in model.parameters()]
        ok, grad_norm, _ = optimizer.step()
        assert ok
        assert grad_norm == pytest.approx(expected_norm, rel=1e-5)
        clipped = torch.sqrt(sum((p.main_grad.float() ** 2).sum() for p in model.parameters())).item()
        assert clipped == pytest.approx(0.01, rel=1e-3)  # clipped to max norm 0.01
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    finally:
        platform.destroy_distributed()
