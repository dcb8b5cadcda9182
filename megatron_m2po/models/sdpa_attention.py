"""Core attention with torch's scaled_dot_product_attention, for the local (non-TE) layer spec.

Megatron's own `DotProductAttention` needs a CUDA global memory buffer and a fused softmax; this module
has the same constructor/forward contract but is plain PyTorch, so it runs on CPU and matches the HF
reference numerically (HF uses the same SDPA kernel).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


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
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism (use the TE layer spec)")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("SDPAttention supports only vanilla softmax without sliding windows")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
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
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None:
            # Megatron masks are True where attention is NOT allowed; SDPA's boolean masks are the opposite.
            sdpa_mask, is_causal = ~attention_mask, False
        else:
            sdpa_mask, is_causal = None, mask_type == AttnMaskType.causal
        context = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=sdpa_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads_per_partition != self.num_groups_per_partition,
        )
        # [b, h, s, d] -> [s, b, h*d]
        b, h, s, d = context.shape
        return context.permute(2, 0, 1, 3).reshape(s, b, h * d)
