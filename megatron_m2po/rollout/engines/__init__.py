"""Rollout engines: one async interface (base.Engine), in-process local, SGLang and vLLM backends.

Backends are imported from their modules (`engines.local`, `engines.sglang`, `engines.vllm`) so that
importing the interface never pulls an optional dependency.
"""

from megatron_m2po.rollout.engines.base import (
    Engine,
    EngineError,
    EngineReplyError,
    EngineRequestError,
    NamedTensors,
)

__all__ = ["Engine", "EngineError", "EngineReplyError", "EngineRequestError", "NamedTensors"]
