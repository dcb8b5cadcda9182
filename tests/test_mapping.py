"""Properties of the weight mapping: splitting HF tensors over TP and gathering them back is the identity."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_m2po.models.mapping import (
    LAYER_RULES,
    Layout,
    hf_slices_for_rank,
    to_hf_tensors,
    to_megatron_shard,
)

RULES = {rule.megatron: rule for rules in LAYER_RULES.values() for rule in rules}


def _slice(t: torch.Tensor, rows):
    if rows is None:
        return t
    dim, start, stop = rows
    return t.narrow(dim, start, stop - start)


@settings(max_examples=60, deadline=None)
@given(
    tp=st.sampled_from([1, 2, 4]),
    groups_per_rank=st.integers(1, 3),
    heads_per_group=st.integers(1, 4),
    head_dim=st.sampled_from([2, 4, 8]),
    hidden=st.sampled_from([4, 8]),
    ffn_per_rank=st.integers(1, 4),
    rule_name=st.sampled_from(sorted(RULES)),
)
def test_split_then_gather_is_identity(
    tp, groups_per_rank, heads_per_group, head_dim, hidden, ffn_per_rank, rule_name
):
    rule = RULES[rule_name]
    kv = groups_per_rank * tp
    layout = Layout(num_heads=kv * heads_per_group, num_kv_heads=kv, head_dim=head_dim)
    q, k = layout.num_heads * head_dim, kv * head_dim
    ffn = ffn_per_rank * tp
    name = rule.hf[0]
    if rule.fuse == "qkv":
        tail = (hidden,) if name.endswith("weight") else ()
        shapes = [(q, *tail), (k, *tail), (k, *tail)]
    elif rule.fuse == "gate_up":
        shapes = [(ffn, hidden), (ffn, hidden)]
    elif name.endswith("o_proj.weight"):
        shapes = [(hidden, q)]
    elif name.endswith("down_proj.weight"):
        shapes = [(hidden, ffn)]
    else:  # norms
        shapes = [(head_dim,) if "q_norm" in name or "k_norm" in name else (hidden,)]
    hf = [torch.randn(s) for s in shapes]
    shards = []
    for rank in range(tp):
        slices = hf_slices_for_rank(rule, layout, shapes, rank, tp)
        shards.append(to_megatron_shard(rule, layout, [_slice(t, s) for t, s in zip(hf, slices)], tp))
    # every rank's shard has the same shape, and together they hold every element exactly once (or replicate)
    assert len({tuple(s.shape) for s in shards}) == 1
    if rule.split != "replicated":
        assert sum(s.numel() for s in shards) == sum(t.numel() for t in hf)
    back = to_hf_tensors(rule, layout, shards)
    assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(back, hf))


def test_qkv_layout_is_per_group():
    """Megatron's fused QKV rows: for each query group, its q heads, then its k head, then its v head."""
    layout = Layout(num_heads=4, num_kv_heads=2, head_dim=1)
    rule = RULES["decoder.layers.{layer}.self_attention.linear_qkv.weight"]
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = to_megatron_shard(rule, layout, [q, k, v], tp_size=1)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
