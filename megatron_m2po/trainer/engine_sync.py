"""The engines' copy of the policy: `EngineSync.push_collective(version)` sends the trainer's weights when they hold an older
version (docs/training.md, "weight sync"; the transports are `sync/weight_sync.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron.core import parallel_state

from megatron_m2po import platform
from megatron_m2po.net import free_port, host_address
from megatron_m2po.sync.broadcast import DistributedWeightBroadcaster
from megatron_m2po.sync.weight_sync import WeightSync


class EngineSync:
    """Which policy version the engines hold, and the transport that gives them a newer one (built on first use,
    on DP replica 0's ranks: the other replicas hold the same weights; with expert parallelism on every rank,
    since each EP group, which gathers the experts, spans several DP replicas)."""

    def __init__(self, trainer, farm, *, version: int):
        """`farm`: rank 0's engines (None on the other ranks); `version`: the version they hold now."""
        self.trainer, self.farm = trainer, farm
        self.version: int | None = version
        self.transport: WeightSync | None = None
        self.metrics: dict[str, float] = {}  # the last push's `sync/` scalars

    def push_collective(self, version: int) -> None:
        """Give the engines the policy at `version`: collective over the ranks of DP replica 0 and CP rank 0
        (every rank under expert parallelism); a no-op if they hold it."""
        takes_part = (
            parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0
        ) or parallel_state.get_expert_model_parallel_world_size() > 1
        if not takes_part or self.version == version:
            return
        if self.transport is None:
            self.transport = self._build()
        self.metrics = self.transport.push_collective(version)
        self.version = version

    def _build(self) -> WeightSync:
        """`rollout.weight_transport`; `auto` picks tensors for in-process engines, NCCL for SGLang on GPU, else
        disk (vLLM servers: disk or tensors, through vLLM's RL routes; they take no NCCL group from this trainer)."""
        rollout = self.trainer.cfg.rollout
        transport = rollout.weight_transport
        if transport == "auto":
            in_process = rollout.engine == "local" or (rollout.engine == "vllm" and not rollout.urls)
            nccl = platform.on_gpu() and rollout.engine == "sglang"
            transport = "tensors" if in_process else ("distributed" if nccl else "disk")
        if transport == "distributed" and rollout.engine == "vllm":
            raise ValueError(
                "rollout.weight_transport=distributed: vLLM engines take weights as tensors or from disk"
            )
        kwargs: dict[str, Any] = {"transport": transport}
        if transport == "disk":
            kwargs["disk_dir"] = Path(self.trainer.cfg.logging.run_dir) / "weights"
        if transport == "distributed" and self.farm is not None:
            broadcaster = DistributedWeightBroadcaster(
                self.farm.engines,
                master_address=host_address(),
                master_port=free_port(""),
                backend=platform.dist_backend(),
                device=platform.device(),
                timeout=rollout.weight_sync_timeout,
            )
            broadcaster.connect(self.farm.loop)
            kwargs["broadcaster"] = broadcaster
        return WeightSync(self.trainer.model, self.trainer.hf_config, self.farm, **kwargs)
