"""The Megatron policy: HF config validation, the HF <-> Megatron weight-name tables, model building for this TP/PP rank."""

from megatron_m2po.models.builder import build_model, forward_logits, transformer_config, unwrap_model
from megatron_m2po.models.hf_config import load_hf_config, validate_hf_config

__all__ = [
    "build_model",
    "forward_logits",
    "load_hf_config",
    "transformer_config",
    "unwrap_model",
    "validate_hf_config",
]
