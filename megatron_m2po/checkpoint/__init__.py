"""HF <-> Megatron weights: loading a policy, live-model gathering, converters, Megatron checkpoints."""

from megatron_m2po.checkpoint.convert import (
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    export_hf_dir_collective,
)
from megatron_m2po.checkpoint.gather import iter_hf_tensors
from megatron_m2po.checkpoint.loading import load_policy
from megatron_m2po.checkpoint.megatron_ckpt import (
    is_megatron_checkpoint,
    load_model_checkpoint,
    load_sharded,
    model_sharded_state_dict,
    save_model_checkpoint,
    save_sharded,
)

__all__ = [
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "export_hf_dir_collective",
    "is_megatron_checkpoint",
    "iter_hf_tensors",
    "load_policy",
    "load_model_checkpoint",
    "load_sharded",
    "model_sharded_state_dict",
    "save_model_checkpoint",
    "save_sharded",
]
