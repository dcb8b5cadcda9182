"""The Megatron policy: HF config validation, model building for this TP/PP rank, weight loading."""

from megatron_m2po.models.builder import build_model, forward_logits, transformer_config, unwrap_model
from megatron_m2po.models.hf_config import load_hf_config, validate_hf_config
from megatron_m2po.models.loading import load_policy

__all__ = [
    "build_model",
    "forward_logits",
    "load_hf_config",
    "load_policy",
    "transformer_config",
    "unwrap_model",
    "validate_hf_config",
]
