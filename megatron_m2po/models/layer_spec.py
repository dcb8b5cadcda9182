"""The decoder's layer spec: Transformer Engine's on GPUs that have it, else the local spec made CPU-capable.

The local spec keeps Megatron's layers but swaps in torch SDPA attention (`sdpa_attention.py`) and torch
RMSNorm (`_RMSNorm`), which run on the CPU and match the HF reference; `platform` says whether TE is usable.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_m2po import platform
from megatron_m2po.models.sdpa_attention import SDPAttention


def gpt_decoder_spec(config, *, use_transformer_engine: bool | None = None):
    """The Megatron decoder spec: Transformer Engine (fused norms + attention) on GPUs that have it, else the
    local spec with torch RMSNorm and SDPA attention (CPU, or GPU without TE), as a block spec so that
    every norm, the final one included, can run under sequence parallelism (`_RMSNorm`)."""
    if use_transformer_engine is None:
        use_transformer_engine = platform.has_transformer_engine()
    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
        )

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, qk_layernorm=config.qk_layernorm, normalization="RMSNorm"
    )
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    if config.num_moe_experts:
        # the TE spec keeps an MoE layer's pre-MLP norm as `pre_mlp_layernorm` (no linear_fc1 to fuse it
        # into): checkpoint it under that key here too, so CPU and GPU checkpoints load into each other
        layer.sharded_state_dict_keys_map = {
            k: v for k, v in layer.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."
        }
    attention.core_attention = SDPAttention
    layer.input_layernorm = layer.pre_mlp_layernorm = _RMSNorm
    if config.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = _RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=_RMSNorm
    )


class _RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with Megatron's norm constructor (`WrappedTorchNorm` refuses sequence parallelism):
    under it each TP rank normalises its slice of the sequence, so the weight is marked for the TP
    all-reduce of its gradient that Megatron's `finalize_model_grads` does for `sequence_parallel` params."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs: Any):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
