"""The trainer's update is layout-independent: TP=2, DP=2 and PP=2 give the loss, grad norm and weights of TP=1.

This pins the normalizer contract (token mean over the whole mini-batch across DP ranks and micro-batches),
Megatron DDP's gradient averaging, and the global-scope M2 pre-pass through the real pipeline schedule.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import REPO, run_torchrun
from tests.dist.trainer_update import make_groups

SCRIPT = REPO / "tests" / "dist" / "trainer_update.py"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from megatron_m2po.models.tiny import make_tiny_model

    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3")


def _run(tiny_dir, tmp_path, nproc: int, tp: int, pp: int, loss: str, *overrides: str) -> dict:
    out = tmp_path / f"out_{nproc}_{tp}_{pp}_{loss}.json"
    run_torchrun(SCRIPT, nproc, tiny_dir, out, tp, pp, loss, *overrides, timeout=300)
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


@pytest.mark.dist
@pytest.mark.parametrize(
    "nproc, tp, pp, micro_batch_size",
    [
        pytest.param(2, 1, 1, 4, id="dp2"),
        pytest.param(2, 1, 2, 8, id="pp2", marks=pytest.mark.slow),
    ],
)
def test_one_microbatch_per_rank_matches_the_pre_pass(tiny_dir, tmp_path, nproc, tp, pp, micro_batch_size):
    """One micro-batch per rank: the M2 threshold from the training forward's log-probs, reduced over the DP
    group inside the schedule (and on the last of two pipeline stages), equals one process's (its pre-pass
    when it has two micro-batches; the diagnostics are means over micro-batches, so the same ones)."""
    setting = f"train.micro_batch_size={micro_batch_size}"
    (tmp_path / "one").mkdir()
    one = _run(tiny_dir, tmp_path / "one", 1, 1, 1, "m2po", setting)
    assert one["updates"][0]["loss/masked_fraction"] > 0
    _assert_same(one, _run(tiny_dir, tmp_path, nproc, tp, pp, "m2po", setting), (nproc, tp, pp, setting))


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


def _two_updates(tiny_dir, loss: str, *, force_pre_pass: bool) -> tuple[list[dict], list, int]:
    """Two updates with one micro-batch of 8 sequences: metrics, weights after, forward passes run."""
    from megatron_m2po.config import Config
    from megatron_m2po.trainer.policy import Policy

    cfg = Config()
    cfg.model.path, cfg.data.path = str(tiny_dir), "unused"
    cfg.train.groups_per_step = cfg.train.groups_per_update = 2
    cfg.train.responses_per_prompt, cfg.train.micro_batch_size, cfg.train.lr = 4, 8, 1e-3
    cfg.algorithm.loss = loss
    trainer = Policy(cfg)
    forwards = []
    trainer.model.module.register_forward_hook(lambda *_: forwards.append(1))
    metrics = [
        trainer.update_collective(make_groups(prefix, 0), version=i, force_pre_pass=force_pre_pass)
        for i, prefix in enumerate("ab")
    ]
    return metrics, [p.detach().clone() for p in trainer.model.parameters()], len(forwards)


@pytest.mark.parametrize("loss", ["m2po", "decoupled_ppo"])
def test_one_microbatch_takes_the_logprobs_before_the_update_from_its_own_forward(tiny_dir, loss):
    """With one micro-batch per rank the training forward's detached log-probs replace the no-grad pre-pass:
    half the forwards, and the same metrics (M2 threshold / proximal policy) and weights as with it."""
    import torch

    from megatron_m2po import platform

    torch.set_num_threads(1)
    platform.init_distributed()
    try:
        with_pre, weights_pre, forwards_pre = _two_updates(tiny_dir, loss, force_pre_pass=True)
        fused, weights_fused, forwards_fused = _two_updates(tiny_dir, loss, force_pre_pass=False)
    finally:
        platform.destroy_distributed()
    assert (forwards_pre, forwards_fused) == (4, 2)
    if loss == "m2po":
        assert with_pre[0]["loss/masked_fraction"] > 0  # the threshold masks tokens: it is exercised
    for a, b in zip(with_pre, fused):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    for a, b in zip(weights_pre, weights_fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
