"""Micro-batch planning and packing: token budgets hold, ranks balance, and the packed model equals the padded one."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from megatron_m2po import platform
from megatron_m2po.models import build_model, load_hf_config
from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.trainer.batching import (
    SequenceRow,
    balanced_partition,
    make_microbatches,
    plan_microbatches,
)
from megatron_m2po.trainer.step import run_model, token_logprobs

lengths_st = st.lists(st.integers(2, 40), min_size=1, max_size=40)


@given(lengths_st, st.integers(1, 4), st.integers(40, 120))
@example([40, 2, 2, 2], 2, 40)
@example([2], 4, 40)
@settings(max_examples=200, deadline=None)
def test_token_budget_plan(lengths, dp, budget):
    plan = plan_microbatches(lengths, dp, micro_batch_size=1, max_tokens=budget)
    assert len(plan) == dp
    assert len({len(shard) for shard in plan}) == 1  # one micro-batch count on every rank
    flat = sorted(i for shard in plan for mb in shard for i in mb)
    assert flat == list(range(len(lengths)))  # every row exactly once
    assert all(sum(lengths[i] for i in mb) <= budget for shard in plan for mb in shard)
    count = len(plan[0])
    # the fewest micro-batches the busiest rank needs, or one more per row it must split (LPT slack)
    busiest = max(sum(lengths[i] for mb in shard for i in mb) for shard in plan)
    assert count >= math.ceil(busiest / budget)


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=60), st.integers(1, 8))
@example([7, 7, 6, 6, 5, 5, 4, 4, 4], 3)
@settings(max_examples=200, deadline=None)
def test_balanced_partition_within_lpt_bound(weights, k):
    bins = balanced_partition(weights, k)
    assert sorted(i for b in bins for i in b) == list(range(len(weights)))
    loads = [sum(weights[i] for i in b) for b in bins]
    # list scheduling's bound: the fullest bin was the lightest (<= the mean) before its last item arrived
    assert max(loads) <= sum(weights) / k + max(weights)
    if len(weights) >= k:
        assert min(loads) > 0  # every bin gets work


def test_count_plan_is_contiguous_shards():
    plan = plan_microbatches([5] * 12, 2, micro_batch_size=4)
    assert plan == [[[0, 1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11]]]


def test_budget_shorter_than_a_sequence_names_the_key():
    with pytest.raises(ValueError, match="train.max_tokens_per_microbatch=10"):
        plan_microbatches([4, 11], 1, micro_batch_size=1, max_tokens=10)


def _rows(lengths: list[int], seed: int = 0) -> list[SequenceRow]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        p = max(1, n // 3)
        rows.append(
            SequenceRow(
                tokens=torch.randint(3, 300, (n,), generator=g).tolist(),
                prompt_len=p,
                behavior_logprobs=(-torch.rand(n - p, generator=g)).tolist(),
                engine_logprobs=(-torch.rand(n - p, generator=g)).tolist(),
                advantage=1.0,
                versions=[0] * (n - p),
            )
        )
    return rows


def test_packed_layout_restarts_positions_and_maps_slots():
    rows = _rows([5, 3, 7])
    (mb,) = make_microbatches(rows, [[0, 1, 2]], consumer_version=1, pad_id=0, pack=True, packed_len=18)
    p = mb.packed
    assert p.cu_seqlens.tolist() == [0, 5, 8, 15, 18]  # the 3 filler tokens are their own segment
    assert p.position_ids[0].tolist() == [*range(5), *range(3), *range(7), *range(3)]
    # every padded target slot that exists reads the same token from the packed targets
    valid = p.index >= 0
    assert torch.equal(p.targets[0][p.index[valid]], mb.targets[valid])
    assert int(valid.sum()) == sum(n - 1 for n in (5, 3, 7))


@pytest.fixture()
def tiny_model(tmp_path):
    torch.set_num_threads(1)
    hf_dir = make_tiny_model("qwen3", tmp_path / "m", num_hidden_layers=2)
    platform.init_distributed()
    try:
        yield build_model(load_hf_config(hf_dir), dtype=torch.float32)
    finally:
        platform.destroy_distributed()


def test_packed_forward_equals_padded(tiny_model):
    """Megatron's THD path (rotary restarted per cu_seqlens segment, SDPA per segment) = right-padded rows."""
    rows = _rows([9, 4, 13, 6], seed=3)
    (padded,) = make_microbatches(rows, [[0, 1, 2, 3]], consumer_version=0, pad_id=0, pack=False)
    (packed,) = make_microbatches(
        rows, [[0, 1, 2, 3]], consumer_version=0, pad_id=0, pack=True, packed_len=40
    )
    lp_pad, ent_pad = token_logprobs(run_model(tiny_model, padded), padded, 1.0, with_entropy=True)
    lp_pack, ent_pack = token_logprobs(run_model(tiny_model, packed), packed, 1.0, with_entropy=True)
    assert padded.packed is None
    mask = packed.packed.index >= 0
    torch.testing.assert_close(lp_pack[mask], lp_pad[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_pack[mask], ent_pad[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute, module", [("full", "layer"), ("selective", "core_attention")])
def test_recompute_reruns_the_forward_in_backward(tmp_path, recompute, module):
    """parallel.recompute reaches Megatron: the checkpointed module runs again during the backward."""
    from megatron_m2po.config import ParallelConfig

    torch.set_num_threads(1)
    hf_dir = make_tiny_model("qwen3", tmp_path / "m", num_hidden_layers=2)
    platform.init_distributed()
    try:
        calls = collections.Counter()
        for mode in ("none", recompute):
            model = build_model(
                load_hf_config(hf_dir), dtype=torch.float32, parallel=ParallelConfig(recompute=mode)
            )
            layer = model.decoder.layers[0]
            target = layer if module == "layer" else layer.self_attention.core_attention
            target.register_forward_hook(lambda *_, m=mode: calls.update([m]))
            ids = torch.randint(3, 300, (2, 8))
            model(ids, torch.arange(8).expand(2, 8), None).float().pow(2).mean().backward()
        assert calls == {"none": 1, recompute: 2}
    finally:
        platform.destroy_distributed()


@pytest.mark.gpu
def test_packed_forward_equals_padded_with_transformer_engine(tmp_path):
    """On a GPU the packed path is Transformer Engine's THD attention (padding_causal over cu_seqlens), bf16."""
    pytest.importorskip("transformer_engine.pytorch")
    hf_dir = make_tiny_model("qwen3", tmp_path / "m", num_hidden_layers=2)
    platform.init_distributed()
    try:
        model = build_model(load_hf_config(hf_dir), use_transformer_engine=True)
        rows = _rows([9, 4, 13, 6], seed=3)
        device = platform.device()
        (padded,) = make_microbatches(rows, [[0, 1, 2, 3]], consumer_version=0, pad_id=0, pack=False)
        (packed,) = make_microbatches(
            rows, [[0, 1, 2, 3]], consumer_version=0, pad_id=0, pack=True, packed_len=48
        )
        padded, packed = padded.to(device), packed.to(device)
        with torch.no_grad():
            lp_pad = token_logprobs(run_model(model, padded), padded, 1.0)
            lp_pack = token_logprobs(run_model(model, packed), packed, 1.0)
        mask = packed.packed.index >= 0
        torch.testing.assert_close(lp_pack[mask], lp_pad[mask], rtol=0.05, atol=0.05)
    finally:
        platform.destroy_distributed()
