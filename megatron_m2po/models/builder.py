"""HF config -> Megatron `TransformerConfig` + `GPTModel` for this rank, and the plain forward used by tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from transformers import PretrainedConfig

from megatron_m2po import platform
from megatron_m2po.config import ParallelConfig
from megatron_m2po.models.hf_config import validate_hf_config
from megatron_m2po.models.layer_spec import gpt_decoder_spec
from megatron_m2po.models.mapping import Layout, architecture, num_experts

# llama3 rope-scaling parameters megatron-core hard-codes; any other value is applied by `_set_llama3_inv_freq`.
_MEGATRON_LLAMA3_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def moe_options(
    hf_config: PretrainedConfig, aux_loss_coef: float | None = None, routing_replay: bool = False
) -> dict:
    """The MoE fields of TransformerConfig for the Qwen3-MoE router and experts (empty for a dense model).

    Router: softmax over the expert logits, top-k, in fp32. HF's `norm_topk_prob` renormalises the k chosen
    probabilities, which equals Megatron's softmax over the k chosen logits (`moe_router_pre_softmax=False`);
    without it the probabilities are the full softmax's (`pre_softmax=True`). Load balancing: Megatron's
    per-layer switch loss with coefficient `aux_loss_coef` (default: config.json's `router_aux_loss_coef`).
    Experts: grouped GEMM with the alltoall dispatcher on GPUs with Transformer Engine, else one MLP per
    expert with the allgather dispatcher (CPU: the alltoall dispatcher needs CUDA streams).
    """
    experts = num_experts(hf_config)
    if not experts:
        return {}
    grouped = platform.has_transformer_engine()
    coef = hf_config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
    return {
        "num_moe_experts": experts,
        "moe_ffn_hidden_size": hf_config.moe_intermediate_size,
        "moe_router_topk": hf_config.num_experts_per_tok,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not hf_config.norm_topk_prob,
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss" if coef else "none",
        "moe_aux_loss_coeff": float(coef),
        "moe_grouped_gemm": grouped,
        "moe_token_dispatcher_type": "alltoall" if platform.on_gpu() else "allgather",
        "moe_permute_fusion": False,
        "moe_enable_routing_replay": routing_replay,
        # TE's fused top-k (moe_utils.topk_routing_with_score_function, fused=True) never asks RouterReplay
        "moe_router_fusion": False,
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
    }


def transformer_config(
    hf_config: PretrainedConfig,
    *,
    dtype: torch.dtype | None = None,
    parallel: ParallelConfig | None = None,
    aux_loss_coef: float | None = None,
    routing_replay: bool = False,
) -> TransformerConfig:
    """Megatron's TransformerConfig equivalent to the HF config, for the current TP/PP/CP/EP sizes; `parallel`
    adds sequence parallelism and activation recompute (neither changes the math); `aux_loss_coef`
    overrides an MoE model's load-balancing coefficient; `routing_replay` lets its routers replay given routing."""
    parallel = parallel or ParallelConfig()
    recompute = {}
    if parallel.recompute == "selective":
        recompute = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    elif parallel.recompute == "full":
        recompute = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": parallel.recompute_num_layers,
        }
    arch = architecture(hf_config)
    dtype = dtype or platform.default_dtype()
    layout = Layout.from_hf_config(hf_config)
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=layout.num_heads,
        num_query_groups=layout.num_kv_heads,
        kv_channels=layout.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch == "Qwen2ForCausalLM",
        qk_layernorm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not platform.on_gpu(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        sequence_parallel=parallel.sequence_parallel,
        **recompute,
        **moe_options(hf_config, aux_loss_coef, routing_replay),
    )


def build_model(
    hf_config: PretrainedConfig,
    *,
    dtype: torch.dtype | None = None,
    use_transformer_engine: bool | None = None,
    parallel: ParallelConfig | None = None,
    aux_loss_coef: float | None = None,
    routing_replay: bool = False,
) -> GPTModel:
    """The randomly initialised GPTModel for this TP/PP/EP rank (parallel_state must be initialised)."""
    validate_hf_config(hf_config, tensor_parallel=parallel_state.get_tensor_model_parallel_world_size())
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if hf_config.num_hidden_layers % pp != 0:
        raise ValueError(
            f"num_hidden_layers={hf_config.num_hidden_layers} is not divisible by pipeline_parallel={pp}"
        )
    config = transformer_config(
        hf_config, dtype=dtype, parallel=parallel, aux_loss_coef=aux_loss_coef, routing_replay=routing_replay
    )
    if use_transformer_engine is False:
        config.moe_grouped_gemm = False  # grouped GEMM comes with the TE spec
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    llama3 = rope.get("rope_type") == "llama3"
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_decoder_spec(config, use_transformer_engine=use_transformer_engine),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope.get("rope_theta", 10000.0),
        rope_scaling=llama3,
        rope_scaling_factor=rope.get("factor", 8.0),
    )
    if llama3:
        _set_llama3_inv_freq(model, rope)
    # torch's RMSNorm (local spec) ignores params_dtype; cast every parameter, as Megatron's Float16Module does
    model.to(dtype=config.params_dtype)
    model.to(platform.device())
    return model


def _set_llama3_inv_freq(model: GPTModel, rope: dict) -> None:
    """megatron-core applies llama3 scaling with fixed low/high_freq_factor and original length; use the config's.

    The scaling itself is Megatron's (`RotaryEmbedding._apply_scaling`, equal to HF's formula); only its
    parameters come from the HF config, so e.g. a model with original_max_position_embeddings != 8192 is exact.
    """
    rotary = model.rotary_pos_emb
    dim = rotary.inv_freq.numel() * 2
    base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    params = {key: rope.get(key, default) for key, default in _MEGATRON_LLAMA3_DEFAULTS.items()}
    rotary.inv_freq = rotary._apply_scaling(base, factor=rope["factor"], **params).to(rotary.inv_freq.device)


def unwrap_model(model) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers (or a one-element list of chunks)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"virtual pipeline chunks are not supported (got {len(model)} model chunks)")
        model = model[0]
    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, GPTModel):
        raise TypeError(f"expected a megatron GPTModel (possibly wrapped), got {type(model).__name__}")
    return model


def forward_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab/tp] of a right-padded batch (causal mask, positions 0..s-1); PP=1 only."""
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("forward_logits runs a single stage; with PP>1 use Megatron's pipeline schedule")
    b, s = input_ids.shape
    position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
    return model(input_ids, position_ids, None)
