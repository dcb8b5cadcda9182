"""The trainer's update is layout-independent: TP=2, DP=2 and PP=2 give the loss, grad norm and weights of TP=1.

This pins the normalizer contract (token mean over the whole mini-batch across DP ranks and micro-batches),
Megatron DDP's gradient averaging, and the global-scope M2 pre-pass through the real pipeline schedule.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import REPO, run_torchrun

SCRIPT = REPO / "tests" / "dist" / "trainer_update.py"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from megatron_m2po.models.tiny import make_tiny_model

    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3")


def _run(tiny_dir, tmp_path, nproc: int, tp: int, pp: int, loss: str) -> dict:
    out = tmp_path / f"out_{nproc}_{tp}_{pp}_{loss}.json"
    run_torchrun(SCRIPT, nproc, tiny_dir, out, tp, pp, loss, timeout=300)
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.parametrize("loss", ["m2po"])
def test_tp2_and_dp2_match_single_process(tiny_dir, tmp_path, loss):
    ref = _run(tiny_dir, tmp_path, 1, 1, 1, loss)
    assert all(math.isfinite(u["loss/value"]) and u["train/grad_norm"] > 0 for u in ref["updates"])
    assert ref["updates"][0]["loss/masked_fraction"] > 0  # the M2 mask is exercised, not a no-op
    for nproc, tp, pp in ((2, 2, 1), (2, 1, 1), (2, 1, 2)):
        got = _run(tiny_dir, tmp_path, nproc, tp, pp, loss)
        for a, b in zip(ref["updates"], got["updates"]):
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (nproc, tp, pp, key)
        assert got["weights_abs_sum"] == pytest.approx(ref["weights_abs_sum"], rel=1e-6)
