"""Packing, token budgets and the memory/throughput options leave the update unchanged, at every layout.

The padded single-process update (tests/dist/trainer_update.py: two m2po updates with the global M2
pre-pass) is the reference. Packing with the same micro-batches must reproduce every logged value (loss,
grad norm, M2 diagnostics) and the weights after both updates; a token budget regroups the sequences, so
the loss, grad norm and weights must match (diagnostics are means over micro-batches and may not).
Sequence parallel, activation recompute, the distributed optimizer and context parallelism (CP = 2: each
rank runs two chunks of every sequence, the log-probs gathered back) change where things are computed or
kept, not the math: every logged value and the weights must match.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_torchrun

SCRIPT = REPO / "tests" / "dist" / "trainer_update.py"
EXACT = ("loss/value", "train/grad_norm")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from megatron_m2po.models.tiny import make_tiny_model

    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3")


def _run(tiny_dir, out_dir, nproc: int, tp: int, pp: int, *overrides: str) -> dict:
    out = out_dir / "out.json"
    run_torchrun(SCRIPT, nproc, tiny_dir, out, tp, pp, "m2po", *overrides, timeout=400)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def padded(tiny_dir, tmp_path_factory) -> dict:
    return _run(tiny_dir, tmp_path_factory.mktemp("padded"), 1, 1, 1)


def _assert_same(got: dict, ref: dict, keys=None) -> None:
    for a, b in zip(ref["updates"], got["updates"]):
        for key in keys or a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert got["weights_abs_sum"] == pytest.approx(ref["weights_abs_sum"], rel=1e-6)


@pytest.mark.dist
@pytest.mark.parametrize(
    "nproc, tp, pp",
    [
        pytest.param(1, 1, 1, id="single"),
        pytest.param(2, 1, 1, id="dp2", marks=pytest.mark.slow),
        pytest.param(2, 2, 1, id="tp2", marks=pytest.mark.slow),
        pytest.param(2, 1, 2, id="pp2", marks=pytest.mark.slow),
    ],
)
def test_packed_equals_padded(tiny_dir, tmp_path, padded, nproc, tp, pp):
    _assert_same(_run(tiny_dir, tmp_path, nproc, tp, pp, "train.pack_sequences=true"), padded)


@pytest.mark.dist
@pytest.mark.parametrize(
    "nproc, tp, pp, budget, overrides",
    [
        pytest.param(2, 1, 1, 12, [], id="dp2-12"),  # about one sequence per micro-batch
        pytest.param(2, 1, 2, 24, [], id="pp2-24", marks=pytest.mark.slow),  # every micro-batch 24 tokens
        pytest.param(2, 2, 1, 40, [], id="tp2-40", marks=pytest.mark.slow),
        # every sequence padded to a multiple of 4 tokens, within the budget
        pytest.param(2, 1, 1, 24, ["parallel.context=2"], id="cp2-24", marks=pytest.mark.slow),
    ],
)
def test_token_budget_gradient_independent_of_split(
    tiny_dir, tmp_path, padded, nproc, tp, pp, budget, overrides
):
    got = _run(tiny_dir, tmp_path, nproc, tp, pp, f"train.max_tokens_per_microbatch={budget}", *overrides)
    _assert_same(got, padded, keys=EXACT)
    assert [u["loss/num_tokens"] for u in got["updates"]] == [u["loss/num_tokens"] for u in padded["updates"]]


@pytest.mark.dist
@pytest.mark.parametrize(
    "nproc, tp, pp, overrides",
    [
        pytest.param(2, 1, 1, ["parallel.distributed_optimizer=true"], id="distopt-dp2"),
        pytest.param(
            2,
            1,
            1,
            ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true"],
            id="distopt-overlap-dp2",
            marks=pytest.mark.slow,
        ),
        pytest.param(2, 2, 1, ["parallel.sequence_parallel=true"], id="sp-tp2", marks=pytest.mark.slow),
        pytest.param(
            2,
            2,
            1,
            ["parallel.sequence_parallel=true", "train.pack_sequences=true"],
            id="sp-packed-tp2",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            2, 2, 1, ["parallel.recompute=selective"], id="recompute-selective-tp2", marks=pytest.mark.slow
        ),
        pytest.param(2, 2, 1, ["parallel.recompute=full"], id="recompute-full-tp2", marks=pytest.mark.slow),
        pytest.param(2, 1, 1, ["parallel.context=2"], id="cp2"),
        pytest.param(
            2,
            1,
            1,
            ["parallel.context=2", "train.pack_sequences=true"],
            id="cp2-packed",
            marks=pytest.mark.slow,
        ),
        # four processes: CP with TP (sequence parallel) and with PP
        pytest.param(
            4,
            2,
            1,
            ["parallel.context=2", "parallel.sequence_parallel=true", "train.pack_sequences=true"],
            id="cp2-sp-tp2-packed",
            marks=pytest.mark.slow,
        ),
        pytest.param(4, 1, 2, ["parallel.context=2"], id="cp2-pp2", marks=pytest.mark.slow),
    ],
)
def test_parallel_option_keeps_the_update(tiny_dir, tmp_path, padded, nproc, tp, pp, overrides):
    _assert_same(_run(tiny_dir, tmp_path, nproc, tp, pp, *overrides), padded)


@pytest.mark.dist
@pytest.mark.slow
def test_distributed_optimizer_checkpoint_resumes_and_reshards(tiny_dir, tmp_path):
    """Saved at DP=2, resumed at DP=2 and at DP=1 (the optimizer shards regrouped): the next update is equal."""
    script = REPO / "tests" / "dist" / "distopt_checkpoint.py"
    ckpt = tmp_path / "ckpt"
    results = {}
    for name, nproc, mode in (("saved", 2, "save"), ("resumed", 2, "load"), ("resharded", 1, "load")):
        out = tmp_path / f"{name}.json"
        run_torchrun(script, nproc, tiny_dir, out, ckpt, mode, timeout=400)
        results[name] = json.loads(out.read_text())
    for name in ("resumed", "resharded"):
        for key, value in results["saved"].items():
            assert results[name][key] == pytest.approx(value, rel=1e-6), (name, key)
