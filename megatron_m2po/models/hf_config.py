"""Read and validate an HF `config.json` before any weight is touched, with errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

from megatron.core import parallel_state
from transformers import AutoConfig, PretrainedConfig

from megatron_m2po.models.mapping import MOE_ARCHITECTURES, architecture

MEGATRON_HF_SUBDIR = "hf"  # a Megatron checkpoint dir keeps its HF config + tokenizer here
SUPPORTED_ROPE_TYPES = ("default", "llama3")


def hf_config_dir(path: str | Path) -> Path:
    """The directory holding config.json: the path itself (HF dir) or `<path>/hf` (Megatron checkpoint)."""
    path = Path(path)
    if (path / "config.json").exists() or not (path / MEGATRON_HF_SUBDIR / "config.json").exists():
        return path
    return path / MEGATRON_HF_SUBDIR


def load_hf_config(hf_dir: str | Path, *, tensor_parallel: int | None = None) -> PretrainedConfig:
    """Load config.json of an HF dir or a Megatron checkpoint dir and check every option we map.

    `tensor_parallel` defaults to Megatron's current TP size when parallel_state is initialised (else 1).
    """
    config_dir = hf_config_dir(hf_dir)
    config_file = config_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(
            f"{config_file}: not found (expected an HF model dir or a Megatron checkpoint dir)"
        )
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    try:
        config = AutoConfig.from_pretrained(config_dir)
    except Exception as err:
        raise ValueError(f"{config_file}: transformers cannot read it ({err})") from err
    try:
        validate_hf_config(config, tensor_parallel=tensor_parallel)
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err
    return config


def _current_tp() -> int:
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


# Families that look like a supported one but compute something this project does not map, by name.
REFUSED_ARCHITECTURES = {
    "Qwen2MoeForCausalLM": "Qwen2-MoE adds a shared expert behind a sigmoid gate to every MoE layer, which "
    "is not mapped; Qwen3MoeForCausalLM (routed experts only) is supported",
}


def validate_hf_config(config: PretrainedConfig, *, tensor_parallel: int | None = None) -> None:
    """Refuse anything the Megatron model would silently compute differently from the HF reference."""
    archs = getattr(config, "architectures", None) or []
    for name in archs:
        if name in REFUSED_ARCHITECTURES:
            raise ValueError(f"architecture {name} is not supported: {REFUSED_ARCHITECTURES[name]}")
    arch = architecture(config)
    tp = tensor_parallel if tensor_parallel is not None else _current_tp()
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_parameters.rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0)")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types {sorted(set(layer_types))} is not supported (only full_attention)")
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and getattr(config, "attention_bias", False):
        raise ValueError(f"attention_bias=true is not supported for {arch}")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported")
    for key in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
        value = getattr(config, key)
        if value % tp != 0:
            raise ValueError(f"{key}={value} is not divisible by tensor_parallel={tp}")
    if config.num_attention_heads % config.num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads={config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    if arch in MOE_ARCHITECTURES:
        validate_moe_config(config)


def validate_moe_config(config: PretrainedConfig) -> None:
    """Every MoE option of the family that the Megatron MoE layer would compute differently (or not at all)."""
    experts = getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"num_experts={experts!r}: expected a positive integer")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"num_experts_per_tok={top_k!r}: expected an integer in [1, num_experts={experts}]")
    if list(getattr(config, "mlp_only_layers", None) or []):
        raise ValueError(
            f"mlp_only_layers={list(config.mlp_only_layers)} is not supported (every layer must be an MoE layer)"
        )
    if getattr(config, "decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"decoder_sparse_step={config.decoder_sparse_step} is not supported (only 1: every layer is an MoE layer)"
        )
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if getattr(config, key, None):
            raise ValueError(f"{key}={getattr(config, key)} is not supported (shared experts are not mapped)")
    coef = getattr(config, "router_aux_loss_coef", 0.0)
    if not isinstance(coef, (int, float)) or coef < 0:
        raise ValueError(f"router_aux_loss_coef={coef!r}: expected a number >= 0")
