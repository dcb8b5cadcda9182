"""A micro-batch under context parallelism: this CP rank's share of its model row, and per-token results back.

Every CP rank holds the whole micro-batch (token ids are small). The model runs on this rank's two chunks
of every sequence (`models.context_parallel.load_balanced_index`: tokens, positions and routed experts cut
alike), the log-probs of the tokens those positions predict are computed there, and `gather` puts every
rank's log-probs back in sequence order. The loss, the M2 pre-pass and the diagnostics therefore see the
same [b, L-1] tensors as without CP, and every CP rank computes the same loss from them.

Gradients: `gather`'s backward keeps each rank's own positions (Megatron's gather-from-model-parallel-region),
so the ranks' parameter gradients add up to the loss's gradient once; Megatron's schedule multiplies a loss
by the CP size and DDP averages gradients over DP x CP, which cancel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron_m2po.models.context_parallel import load_balanced_index, rank_major_order, segment_lengths
from megatron_m2po.trainer.batching import MicroBatch


@dataclass
class ContextShare:
    """This CP rank's positions of a model row [b, n] (padded [b, L], or packed [1, T])."""

    index: torch.Tensor  # [n / cp] long: the positions this rank holds, in its local order
    order: torch.Tensor  # [n] long: where each position sits in the ranks' shares concatenated in rank order
    group: torch.distributed.ProcessGroup

    def take(self, row: torch.Tensor) -> torch.Tensor:
        """This rank's share of a per-position tensor [b, n, ...] -> [b, n / cp, ...]."""
        return row.index_select(1, self.index.to(row.device))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's [b, n / cp] in sequence order [b, n] (collective over the CP group)."""
        everyone = gather_from_tensor_model_parallel_region(local.contiguous(), group=self.group)
        return everyone.index_select(-1, self.order.to(everyone.device))


def context_share(mb: MicroBatch) -> ContextShare | None:
    """The share of `mb`'s model row on this CP rank; None without context parallelism."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return None
    lengths = [mb.tokens.shape[1]] if mb.packed is None else segment_lengths(mb.packed.cu_seqlens)
    return ContextShare(
        index=load_balanced_index(lengths, cp, parallel_state.get_context_parallel_rank()),
        order=rank_major_order(lengths, cp),
        group=parallel_state.get_context_parallel_group(),
    )


def next_tokens(row: torch.Tensor) -> torch.Tensor:
    """The token each position of a model row [b, n] predicts, [b, n]; the last position predicts none and
    takes its own token (any valid id: its log-prob is dropped after the gather)."""
    return torch.cat([row[:, 1:], row[:, -1:]], dim=1)
