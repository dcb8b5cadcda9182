"""Context parallelism on GPUs: CP = 2 with Transformer Engine's attention (its ring exchange over Megatron's
load-balanced chunks) gives CP = 1's log-probs and gradients, dense and MoE, padded and packed (bf16).

    python -m pytest -q -m gpu tests/test_context_parallel_gpu.py     # (tools/gpu_checks.sh runs it)

The same script as the CPU test (tests/test_context_parallel.py), where the reference attention stands in for TE's.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_m2po.models.tiny import make_tiny_model
from tests.conftest import REPO, free_port, subprocess_env

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="CP = 2 needs two GPUs")
def test_cp2_with_transformer_engine_gives_cp1(tmp_path):
    dense = make_tiny_model("qwen3", tmp_path / "qwen3", seed=5)
    moe = make_tiny_model("qwen3_moe", tmp_path / "qwen3_moe", seed=5)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
        str(REPO / "tests" / "dist" / "context_parallel_parity.py"), str(dense), str(moe),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    for arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        for layout in ("padded", "packed"):
            assert f"{arch} {layout}: log-probs and" in proc.stdout, proc.stdout[-3000:]
    assert "(TEDotProductAttention)" in proc.stdout, proc.stdout[-3000:]
