"""Trainer side of the distributed weight update: metadata over HTTP, tensors by broadcast from rank 0.

Per bucket: every engine gets `/update_weights_from_distributed` {names, dtypes, shapes} and starts
receiving; meanwhile the trainer broadcasts each tensor, in that order, on the update group (NCCL on
GPU; gloo works too, which is how the CPU tests run the same protocol against our local server).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_m2po.sync.process_group import broadcast_from_trainer, new_weight_update_group

logger = logging.getLogger(__name__)


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's dtype strings are torch's without the prefix ("bfloat16", "float32")."""
    return str(dtype).removeprefix("torch.")


class DistributedWeightBroadcaster:
    """Owns the update group between the trainer (rank 0) and the engines (each `gpus` ranks after it)."""

    def __init__(
        self,
        engines: Sequence,
        *,
        master_address: str,
        master_port: int,
        group_name: str = "m2po_weight_update",
        backend: str = "nccl",
        device: torch.device | str | None = None,
    ):
        self.engines = list(engines)
        for e in self.engines:
            if not hasattr(e, "init_weights_update_group"):
                raise TypeError(
                    f"engine {e.engine_id} ({type(e).__name__}) cannot join a weight-update group"
                )
        self.master_address, self.master_port = master_address, master_port
        self.group_name, self.backend = group_name, backend
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.world_size = 1 + sum(e.gpus for e in self.engines)
        self.group: dist.ProcessGroup | None = None

    def connect(self, loop: asyncio.AbstractEventLoop) -> None:
        """Engines join (HTTP calls in `loop`) while this thread joins as rank 0; both block until all are in."""
        offsets, offset = [], 1
        for e in self.engines:
            offsets.append(offset)
            offset += e.gpus

        async def join_all():
            await asyncio.gather(
                *(
                    e.init_weights_update_group(
                        self.master_address,
                        self.master_port,
                        off,
                        self.world_size,
                        self.group_name,
                        self.backend,
                    )
                    for e, off in zip(self.engines, offsets)
                )
            )

        joined = asyncio.run_coroutine_threadsafe(join_all(), loop)
        self.group = new_weight_update_group(
            self.master_address, self.master_port, 0, self.world_size, self.group_name, self.backend
        )
        joined.result()
        logger.info("weight-update group %s: trainer + %d engine ranks", self.group_name, self.world_size - 1)

    def send_bucket(
        self, bucket: list[tuple[str, torch.Tensor]], version: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        if self.group is None:
            raise RuntimeError("DistributedWeightBroadcaster.send_bucket before connect()")
        names = [n for n, _ in bucket]
        dtypes = [dtype_name(t.dtype) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]

        async def announce():
            await asyncio.gather(
                *(
                    e.update_weights_from_distributed(
                        names, dtypes, shapes, version, group_name=self.group_name
                    )
                    for e in self.engines
                )
            )

        replies = asyncio.run_coroutine_threadsafe(announce(), loop)
        for _, tensor in bucket:
            broadcast_from_trainer(self.group, tensor.detach().to(self.device).contiguous())
        replies.result()

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
