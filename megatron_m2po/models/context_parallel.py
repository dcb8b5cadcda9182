"""Megatron's load-balanced context-parallel layout: which positions of a sequence each CP rank holds.

Causal attention costs more towards the end of a sequence, so Megatron cuts every sequence (every packed
segment) into 2 x CP equal chunks and gives rank r chunks r and 2 CP - 1 - r: one early and one late chunk,
the same work on every rank. Megatron-LM's `get_batch_on_this_cp_rank` lays out a batch this way (through
Transformer Engine's `thd_get_partitioned_indices` for packed sequences), Megatron's rotary embedding assumes
it (`get_pos_emb_on_this_cp_rank`, `_get_thd_freqs_on_this_cp_rank`) and TE's context-parallel attention
computes on it. The trainer cuts its micro-batches with `load_balanced_index`, and the CPU reference
attention (`sdpa_attention.py`) puts the gathered keys and values back in sequence order with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def load_balanced_index(segment_lengths: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """The positions of the concatenated segments that CP rank `cp_rank` holds, in its local order: for each
    segment, chunk `cp_rank` then chunk `2 cp_size - 1 - cp_rank` of its 2 x cp_size chunks.

    Every segment length must be a multiple of 2 x cp_size (the trainer pads each sequence to one)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is not a rank of a context-parallel group of {cp_size}")
    chunks = 2 * cp_size
    parts, offset = [], 0
    for n in segment_lengths:
        if n % chunks:
            raise ValueError(
                f"context parallelism: a sequence of {n} tokens is not a multiple of 2 x CP = {chunks} "
                "(each sequence is padded to one before it is split)"
            )
        size = n // chunks
        for chunk in (cp_rank, chunks - 1 - cp_rank):
            parts.append(torch.arange(offset + chunk * size, offset + (chunk + 1) * size))
        offset += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def rank_major_order(segment_lengths: Sequence[int], cp_size: int) -> torch.Tensor:
    """Where each position of the sequence sits in the CP ranks' shares concatenated in rank order (what an
    all-gather returns): `gathered[..., order]` restores sequence order."""
    index = torch.cat([load_balanced_index(segment_lengths, cp_size, r) for r in range(cp_size)])
    return torch.argsort(index)


def segment_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """The segment lengths of a packed row from its bounds [0, ..., T]."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
