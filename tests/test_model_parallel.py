"""TP=2 and PP=2 under torchrun (gloo) reproduce TP=1 logits and gradients, and load converted checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_m2po import platform
from megatron_m2po.checkpoint.convert import convert_hf_to_megatron
from megatron_m2po.models.tiny import make_tiny_model
from tests.conftest import REPO, run_torchrun

SCRIPT = REPO / "tests" / "dist" / "model_parallel_parity.py"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mp")
    for arch in ("qwen3", "qwen2", "llama"):  # llama: tied embeddings, so PP=2 exercises the tied copy
        make_tiny_model(arch, root / arch, seed=11)
        convert_hf_to_megatron(root / arch, root / f"{arch}-megatron", tensor_parallel=2, pipeline_parallel=2)
    platform.destroy_distributed()
    return root


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["tp", "pp"])
def test_parallel_matches_single_rank(workdir, mode):
    proc = run_torchrun(SCRIPT, 2, mode, workdir)
    for arch in ("qwen3", "qwen2", "llama"):
        assert f"{arch} {mode}: logits" in proc.stdout
