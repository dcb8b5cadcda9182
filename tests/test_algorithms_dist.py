"""Two gloo processes: the global M2 threshold is the same for DP=1 / DP=2 and any micro-batch split, and
vocab-parallel log-probs/entropy at TP=2 equal TP=1, log_softmax of the full logits, and Megatron's
vocab_parallel_cross_entropy under its parallel_state."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_torchrun


@pytest.mark.dist
def test_global_m2_mask_and_vocab_parallel_logprobs_under_torchrun():
    proc = run_torchrun(REPO / "tests" / "dist" / "algorithms_parallel.py", 2, timeout=300)
    assert "algorithms_parallel OK" in proc.stdout
