"""Overlong handling: DAPO's soft overlong punishment (eq. 13) against the paper's piecewise formula written
here, and overlong filtering's rows outside the loss mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from megatron_m2po.algorithms import soft_overlong_penalty
from megatron_m2po.trainer.batching import SequenceRow, rows_to_microbatch


def dapo_eq13(length: int, l_max: int, l_cache: int) -> float:
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


@given(data=st.data(), l_max=st.integers(1, 64))
@example(data=None, l_max=8)
def test_soft_overlong_penalty_is_dapo_eq13(data, l_max):
    if data is None:  # the edges: the ramp's start, its end at L_max (-1), beyond L_max, a buffer of L_max
        cases = [(4, 8, 4), (5, 8, 4), (8, 8, 4), (9, 8, 4), (0, 8, 8), (8, 8, 8)]
    else:
        l_cache = data.draw(st.integers(1, l_max))
        lengths = data.draw(st.lists(st.integers(0, 2 * l_max), min_size=1, max_size=20))
        cases = [(n, l_max, l_cache) for n in lengths]
    for n, lm, lc in cases:
        got = soft_overlong_penalty(torch.tensor([n]), lm, lc).item()
        assert got == pytest.approx(dapo_eq13(n, lm, lc), abs=1e-12), (n, lm, lc)


def test_soft_overlong_penalty_refuses_a_buffer_outside_the_budget():
    with pytest.raises(ValueError, match="buffer must be in"):
        soft_overlong_penalty(torch.tensor([3]), 8, 9)
    with pytest.raises(ValueError, match="buffer must be in"):
        soft_overlong_penalty(torch.tensor([3]), 8, 0)


def test_a_filtered_row_has_no_token_in_the_loss_mask():
    def row(in_loss):
        return SequenceRow([1, 2, 3, 4, 5], 2, [-0.1] * 3, [-0.1] * 3, 1.0, [0] * 3, in_loss=in_loss)

    mb = rows_to_microbatch([row(True), row(False)], consumer_version=0, pad_id=0)
    assert mb.response_mask[0].sum() == 3 and mb.response_mask[1].sum() == 0
