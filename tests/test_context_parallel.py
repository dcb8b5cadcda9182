"""Context parallelism: Megatron's load-balanced layout, the packing that feeds it, the layout checks, and CP = 2
on two processes computing what CP = 1 computes (log-probs and gradients of dense and MoE models, padded and
packed; the whole trainer update is in tests/test_packing.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from megatron_m2po import platform
from megatron_m2po.config import Config, ConfigError, validate_parallel
from megatron_m2po.models.context_parallel import load_balanced_index, rank_major_order
from megatron_m2po.trainer.batching import SequenceRow, pack_rows
from tests.conftest import REPO, run_torchrun

segments = st.lists(st.integers(1, 12), min_size=1, max_size=5)  # in chunks: length = chunks x 2 x CP


class _Group:
    """The size and rank Megatron's rotary helpers ask a CP process group for."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), segments)
@example(2, [1])
@example(4, [3, 1, 2])
def test_layout_is_the_one_megatrons_rotary_embedding_assumes(cp, chunks):
    """Padded (one segment): `get_pos_emb_on_this_cp_rank`; packed: `_get_thd_freqs_on_this_cp_rank` per
    segment, both over the positions 0..n-1 of each sequence."""
    from megatron.core.models.common.embeddings import rope_utils

    platform.apply_cpu_shims()  # rope_utils builds its index tensor pinned, then moves it with .cuda()
    lengths = [c * 2 * cp for c in chunks]
    positions = torch.cat([torch.arange(n) for n in lengths])
    for rank in range(cp):
        index = load_balanced_index(lengths, cp, rank)
        assert index.numel() == sum(lengths) // cp
        single = torch.arange(lengths[0]).float()
        expected = rope_utils.get_pos_emb_on_this_cp_rank(single, 0, _Group(cp, rank))
        assert torch.equal(load_balanced_index(lengths[:1], cp, rank).float(), expected)
        freqs = torch.arange(max(lengths))
        expected = torch.cat(
            [
                rope_utils._get_thd_freqs_on_this_cp_rank(rank, cp, torch.empty(n // cp), freqs)
                for n in lengths
            ]
        )
        assert torch.equal(positions[index], expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), segments, st.integers(1, 3))
@example(2, [1, 2], 1)
def test_the_ranks_shares_gathered_in_rank_order_restore_the_sequence(cp, chunks, batch):
    lengths = [c * 2 * cp for c in chunks]
    row = torch.randn(batch, sum(lengths))
    shares = [row[:, load_balanced_index(lengths, cp, r)] for r in range(cp)]
    gathered = torch.cat(shares, dim=1)  # what the CP all-gather returns
    assert torch.equal(gathered[:, rank_major_order(lengths, cp)], row)
    # every position is held by exactly one rank
    held = torch.cat([load_balanced_index(lengths, cp, r) for r in range(cp)])
    assert torch.equal(held.sort().values, torch.arange(sum(lengths)))


def test_a_sequence_not_padded_to_two_cp_chunks_is_refused():
    with pytest.raises(ValueError, match="a sequence of 6 tokens is not a multiple of 2 x CP = 4"):
        load_balanced_index([8, 6], 2, 0)
    with pytest.raises(ValueError, match="cp_rank 2 is not a rank"):
        load_balanced_index([8], 2, 2)


def test_packed_segments_are_padded_for_the_cp_split():
    """Each sequence's segment is padded at its end to a multiple of 2 x CP; positions run on through the
    padding (so Megatron's rotary slices are the sequence's), and the padded layout's slots map to the
    sequence's own tokens."""
    rows = [
        SequenceRow(tokens=list(range(10, 10 + n)), prompt_len=2, behavior_logprobs=[], engine_logprobs=[],
                    advantage=0.0, versions=[])
        for n in (5, 8, 3)
    ]  # fmt: skip
    packed = pack_rows(rows, 8, pad_id=0, packed_len=None, segment_multiple=4)
    assert packed.cu_seqlens.tolist() == [0, 8, 16, 20]
    assert packed.tokens[0, :8].tolist() == [10, 11, 12, 13, 14, 0, 0, 0]
    assert packed.position_ids[0].tolist() == [*range(8), *range(8), *range(4)]
    assert packed.index[0].tolist() == [0, 1, 2, 3, -1, -1, -1]
    assert packed.index[2].tolist() == [16, 17, -1, -1, -1, -1, -1]
    assert torch.equal(packed.targets[0, packed.index[1]], torch.arange(11, 18))
    with pytest.raises(ValueError, match="filler segment that is not a multiple of 4"):
        pack_rows(rows, 8, pad_id=0, packed_len=22, segment_multiple=4)


def _cfg(**parallel) -> Config:
    cfg = Config()
    cfg.model.path, cfg.data.path = "m", "d"
    cfg.train.groups_per_update, cfg.train.responses_per_prompt = 2, 4
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def test_layouts_with_context_parallelism_are_checked_before_megatron_starts():
    assert validate_parallel(_cfg(context=2), 2) == 1
    assert validate_parallel(_cfg(context=2, tensor=2), 8) == 2  # DP is what TP x PP x CP leave
    assert validate_parallel(_cfg(context=2, pipeline=2), 4) == 1
    with pytest.raises(
        ConfigError, match=r"'parallel.context' = 1 x 1 x 2 = 2 does not divide the world size 3"
    ):
        validate_parallel(_cfg(context=2), 3)
    with pytest.raises(ConfigError, match=r"= 2 x 1 x 2 = 4 does not divide the world size 6"):
        validate_parallel(_cfg(context=2, tensor=2), 6)
    cfg = _cfg(context=2)
    cfg.model.dtype = "float32"
    assert validate_parallel(cfg, 2) == 1  # the CPU reference attention computes in fp32
    with pytest.raises(ConfigError, match=r"'model.dtype': float32 with parallel.context > 1 on GPUs"):
        validate_parallel(cfg, 2, transformer_engine=True)
    cfg = _cfg(context=2)
    cfg.train.groups_per_update, cfg.train.responses_per_prompt = 1, 3
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 2"):
        validate_parallel(cfg, 4)  # CP does not split the batch: DP = 4 / 2


def test_a_token_budget_must_hold_the_longest_sequence_padded_for_cp():
    from megatron_m2po.config import validate

    cfg = _cfg(context=4)
    cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens = 30, 60  # 90, padded to 96 for 2 x CP = 8
    cfg.train.max_tokens_per_microbatch = 90
    with pytest.raises(ConfigError, match=r"padded to a multiple of 2 x parallel.context = 8: 96"):
        validate(cfg)
    cfg.train.max_tokens_per_microbatch = 96
    validate(cfg)
    with pytest.raises(ConfigError, match=r"'parallel.context': must be >= 1"):
        validate(_cfg(context=0))


@pytest.mark.dist
def test_cp2_gives_cp1_logprobs_and_gradients(tmp_path):
    """Two processes at CP = 2 (gloo, the CPU reference attention) against CP = 1: a dense Qwen3 and a
    Qwen3-MoE replaying its routing, padded and packed micro-batches, fp32."""
    from megatron_m2po.models.tiny import make_tiny_model

    dense = make_tiny_model("qwen3", tmp_path / "qwen3", seed=5)
    moe = make_tiny_model("qwen3_moe", tmp_path / "qwen3_moe", seed=5)
    proc = run_torchrun(REPO / "tests" / "dist" / "context_parallel_parity.py", 2, dense, moe, timeout=600)
    for arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        for layout in ("padded", "packed"):
            assert f"{arch} {layout}: log-probs and" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.dist
@pytest.mark.slow
def test_cp2_with_expert_parallelism_gives_cp1(tmp_path):
    """EP = 2 beside CP = 2 on two processes (every expert reached by both CP ranks' tokens through the
    allgather dispatcher) against EP = 2 at CP = 1: log-probs, dense and expert gradients."""
    from megatron_m2po.models.tiny import make_tiny_model

    moe = make_tiny_model("qwen3_moe", tmp_path / "qwen3_moe", seed=5)
    proc = run_torchrun(REPO / "tests" / "dist" / "context_parallel_parity.py", 2, "ep2", moe, timeout=600)
    for layout in ("padded", "packed"):
        assert f"Qwen3MoeForCausalLM {layout} ep2: log-probs and" in proc.stdout, proc.stdout[-3000:]
