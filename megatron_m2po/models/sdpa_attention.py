"""Core attention with torch's scaled_dot_product_attention, for the local (non-TE) layer spec.

Megatron's own `DotProductAttention` needs a CUDA global memory buffer and a fused softmax; this module
has the same constructor/forward contract but is plain PyTorch, so it runs on CPU and matches the HF
reference numerically (HF uses the same SDPA kernel).

Packed sequences (`packed_seq_params.qkv_format == "thd"`, q [t, np, hn]) are attended one sequence at a
time, causally within each `cu_seqlens` segment: the same arithmetic as a right-padded row (padding sits
after the real tokens, so causality already hides it), and no t x t block-diagonal mask is materialised.

Context parallelism (the CP group has more than one rank) is the reference for Transformer Engine's: each
rank holds two chunks of every sequence in Megatron's load-balanced layout (`context_parallel.py`); here the
keys and values are all-gathered over the CP group (their gradients reduce-scattered back in the backward)
and put in sequence order, and this rank's queries attend to them causally by their positions in the
sequence. It computes what CP = 1 computes; TE's ring exchange is what makes it cheap on GPUs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_m2po.models.context_parallel import load_balanced_index, rank_major_order, segment_lengths


class SDPAttention(MegatronModule):
    """Drop-in `core_attention` for `SelfAttention`: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("SDPAttention supports only vanilla softmax without sliding windows")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp_size = pg_collection.tp.size()
        self.cp_group = pg_collection.cp
        self.attn_mask_type = attn_mask_type
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if self.cp_group.size() > 1:
            return self._context_parallel(query, key, value, attention_mask, mask_type, packed_seq_params)
        if packed_seq_params is not None:
            if mask_type != AttnMaskType.causal:
                raise ValueError(f"SDPAttention: packed sequences need a causal mask type, got {mask_type}")
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None:
            # Megatron masks are True where attention is NOT allowed; SDPA's boolean masks are the opposite.
            sdpa_mask, is_causal = ~attention_mask, False
        else:
            sdpa_mask, is_causal = None, mask_type == AttnMaskType.causal
        context = self._sdpa(q, k, v, sdpa_mask, is_causal)
        # [b, h, s, d] -> [s, b, h*d]
        b, h, s, d = context.shape
        return context.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _sdpa(self, q, k, v, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads_per_partition != self.num_groups_per_partition,
        )

    @staticmethod
    def _check_packed(params) -> None:
        if params.qkv_format != "thd":
            raise ValueError(
                f"SDPAttention: packed_seq_params.qkv_format must be 'thd', got {params.qkv_format!r}"
            )
        if not torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv):
            raise ValueError("SDPAttention: packed self-attention needs cu_seqlens_q == cu_seqlens_kv")
        if params.cu_seqlens_q_padded is not None and not torch.equal(
            params.cu_seqlens_q_padded, params.cu_seqlens_q
        ):
            raise ValueError("SDPAttention: padded cu_seqlens (gaps between segments) are not supported")

    def _packed(self, query, key, value, params) -> torch.Tensor:
        """THD: q [t, np, hn], k/v [t, ng, hn] -> [t, np*hn], causal attention inside each segment."""
        self._check_packed(params)
        bounds = params.cu_seqlens_q.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(
                f"SDPAttention: cu_seqlens must run from 0 to the packed length {query.shape[0]}, got {bounds}"
            )
        out = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            # [n, h, d] -> [1, h, n, d]
            q, k, v = (t[s:e].permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))
            out.append(self._sdpa(q, k, v, None, True)[0].permute(1, 0, 2))  # [n, h, d]
        context = torch.cat(out)
        return context.reshape(context.shape[0], -1)

    def _context_parallel(self, query, key, value, attention_mask, mask_type, params) -> torch.Tensor:
        """This CP rank's queries (two chunks of every sequence) against the whole sequences' keys and values.

        Padded: q [s/cp, b, np, hn] -> [s/cp, b, np*hn]; packed: q [t/cp, np, hn] -> [t/cp, np*hn]."""
        if mask_type != AttnMaskType.causal or attention_mask is not None:
            raise ValueError(
                "SDPAttention: context parallelism needs causal attention without an explicit mask"
            )
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        if params is None:
            lengths = [query.shape[0] * cp]
        else:
            self._check_packed(params)
            lengths = segment_lengths(params.cu_seqlens_q)
            if sum(lengths) != query.shape[0] * cp:
                raise ValueError(
                    f"SDPAttention: cu_seqlens cover {sum(lengths)} tokens, but {cp} CP ranks hold "
                    f"{query.shape[0]} each"
                )
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # [t, 1, h, d]
        order = rank_major_order(lengths, cp).to(query.device)
        key, value = (
            gather_from_sequence_parallel_region(t, True, self.cp_group).index_select(0, order)
            for t in (key, value)
        )
        mine = load_balanced_index(lengths, cp, rank).to(query.device)
        out, start, local = [], 0, 0
        for n in lengths:
            here = n // cp
            q_pos = mine[local : local + here]
            k_pos = torch.arange(start, start + n, device=query.device)
            allowed = k_pos[None, :] <= q_pos[:, None]  # [here, n]: causal by position in the sequence
            # [s, b, h, d] -> [b, h, s, d]
            q, k, v = (
                t.permute(1, 2, 0, 3)
                for t in (query[local : local + here], key[start : start + n], value[start : start + n])
            )
            out.append(self._sdpa(q, k, v, allowed, False).permute(2, 0, 1, 3))  # [here, b, h, d]
            start, local = start + n, local + here
        context = torch.cat(out)
        if params is not None:
            context = context.squeeze(1)
        return context.reshape(*context.shape[:-2], -1)
