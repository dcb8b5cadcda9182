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


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory) -> dict:
    ref = _run(tiny_dir, tmp_path_factory.mktemp("ref"), 1, 1, 1, "m2po")
    assert all(math.isfinite(u["loss/value"]) and u["train/grad_norm"] > 0 for u in ref["updates"])
    assert ref["updates"][0]["loss/masked_fraction"] > 0  # the M2 mask is exercised, not a no-op
    return ref


@pytest.mark.dist
@pytest.mark.parametrize(
    "nproc, tp, pp",
    [
        pytest.param(2, 1, 1, id="dp2"),
        pytest.param(2, 2, 1, id="tp2", marks=pytest.mark.slow),
        pytest.param(2, 1, 2, id="pp2", marks=pytest.mark.slow),
    ],
)
def test_layout_matches_single_process(tiny_dir, tmp_path, reference, nproc, tp, pp):
    _assert_same(reference, _run(tiny_dir, tmp_path, nproc, tp, pp, "m2po"), (nproc, tp, pp))


def _assert_same(reference: dict, got: dict, label) -> None:
    for a, b in zip(reference["updates"], got["updates"]):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (label, key)
    assert got["weights_abs_sum"] == pytest.approx(reference["weights_abs_sum"], rel=1e-6)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["decoupled_ppo", "gspo"])
def test_what_a_loss_declares_reaches_it_through_the_trainer(tiny_dir, tmp_path, loss):
    """decoupled_ppo asks the trainer for the pre-pass (its proximal log-probs; without them it raises), gspo
    brings its own seq-mean aggregation: both train, and DP=2 equals one process."""
    one = _run(tiny_dir, tmp_path, 1, 1, 1, loss)
    assert all(math.isfinite(u["loss/value"]) and u["train/grad_norm"] > 0 for u in one["updates"])
    _assert_same(one, _run(tiny_dir, tmp_path, 2, 1, 1, loss), loss)
