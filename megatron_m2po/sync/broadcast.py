"""Trainer side of the distributed weight update: metadata over HTTP, tensors by broadcast from rank 0.

The update group holds the trainer (rank 0) and every GPU of every member engine: an SGLang server joins
with `tp_size` ranks (read from its /server_info), at rank_offset + tp_rank. Per bucket every member gets
`/update_weights_from_distributed` {names, dtypes, shapes} and starts receiving; meanwhile the trainer
broadcasts each tensor, in that order (NCCL on GPU; gloo works too, which is how the CPU tests run the same
protocol against our local server). Membership is fixed per group, so when the engines able to take an
update change (one joined the farm after the start, or one is down), the group is destroyed on both
sides and created again under a new name and port.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_m2po import platform
from megatron_m2po.net import free_port
from megatron_m2po.sync.process_group import broadcast_from_trainer, new_weight_update_group

logger = logging.getLogger(__name__)


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's dtype strings are torch's without the prefix ("bfloat16", "float32")."""
    return str(dtype).removeprefix("torch.")


class DistributedWeightBroadcaster:
    """Owns the update group between the trainer (rank 0) and the member engines' GPUs (ranks after it)."""

    def __init__(
        self,
        engines: Sequence,
        *,
        master_address: str,
        master_port: int,
        group_name: str | None = None,
        backend: str = "nccl",
        device: torch.device | str | None = None,
    ):
        self.engines = self._check(engines)
        self.master_address, self.master_port = master_address, master_port
        # One name per trainer incarnation: servers that outlive a trainer killed before close() still hold
        # its group under its name (SGLang has no replace path and torch refuses a name in use).
        self.base_name = group_name or f"m2po_weight_update-{uuid.uuid4().hex[:12]}"
        self.backend = backend
        self.group_name = self.base_name
        self.device = torch.device(device) if device is not None else platform.backend_device(backend)
        self.world_size = 0
        self.generation = 0  # groups created so far; each gets its own name and port
        self.group: dist.ProcessGroup | None = None

    @staticmethod
    def _check(engines: Sequence) -> list:
        for e in engines:
            if not hasattr(e, "init_weights_update_group"):
                raise TypeError(
                    f"engine {e.engine_id} ({type(e).__name__}) cannot join a weight-update group"
                )
        return list(engines)

    def connect(self, loop: asyncio.AbstractEventLoop, engines: Sequence | None = None) -> None:
        """(Re)create the group with `engines` (default: the current members); the engines join over HTTP in
        `loop` while this thread joins as rank 0, and both block until every rank is in."""
        if engines is not None:
            self.engines = self._check(engines)
        if self.group is not None:
            self._destroy(loop)
        members = self.engines

        async def gpus():
            await asyncio.gather(*(e.connect() for e in members if hasattr(e, "connect")))
            return [e.gpus for e in members]

        counts = asyncio.run_coroutine_threadsafe(gpus(), loop).result()
        self.world_size = 1 + sum(counts)
        offsets = [1 + sum(counts[:i]) for i in range(len(members))]
        port = self.master_port if self.generation == 0 else free_port()
        self.group_name = self.base_name if self.generation == 0 else f"{self.base_name}-{self.generation}"
        self.generation += 1

        async def join_all():
            await asyncio.gather(
                *(
                    e.init_weights_update_group(
                        self.master_address, port, off, self.world_size, self.group_name, self.backend
                    )
                    for e, off in zip(members, offsets)
                )
            )

        joined = asyncio.run_coroutine_threadsafe(join_all(), loop)
        self.group = new_weight_update_group(
            self.master_address, port, 0, self.world_size, self.group_name, self.backend
        )
        joined.result()
        for e in members:
            e.needs_new_group = False
        logger.info(
            "weight-update group %s: trainer + %d engine ranks (%s)",
            self.group_name,
            self.world_size - 1,
            ", ".join(e.engine_id for e in members),
        )

    def ensure_members(self, engines: Sequence, loop: asyncio.AbstractEventLoop) -> None:
        """Recreate the group when the engines that will receive this update are not its members, or one of
        them was restarted (`needs_new_group`: it left the group with its old process)."""
        restarted = [e.engine_id for e in engines if getattr(e, "needs_new_group", False)]
        if (
            restarted
            or [e.engine_id for e in engines] != [e.engine_id for e in self.engines]
            or self.group is None
        ):
            logger.info(
                "weight-update group members change: %s -> %s (restarted: %s)",
                [e.engine_id for e in self.engines],
                [e.engine_id for e in engines],
                restarted,
            )
            self.connect(loop, engines)

    def _destroy(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Leave the group on both sides; an engine that cannot be reached is only logged (it is gone)."""
        if loop is not None and loop.is_running() and self.engines:

            async def leave():
                return await asyncio.gather(
                    *(e.destroy_weights_update_group(self.group_name) for e in self.engines),
                    return_exceptions=True,
                )

            results = asyncio.run_coroutine_threadsafe(leave(), loop).result(timeout=120)
            for e, r in zip(self.engines, results):
                if isinstance(r, BaseException):
                    logger.warning("engine %s: leaving group %s failed: %s", e.engine_id, self.group_name, r)
        dist.destroy_process_group(self.group)
        self.group = None

    def send_bucket(
        self, bucket: list[tuple[str, torch.Tensor]], version: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Announce the bucket to every member and broadcast it. An engine that answers with a failure has
        still received the tensors (the collective completed); it reports the failure when the update
        finishes and leaves rotation, the others go on."""
        if self.group is None:
            raise RuntimeError("DistributedWeightBroadcaster.send_bucket before connect()")
        names = [n for n, _ in bucket]
        dtypes = [dtype_name(t.dtype) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]

        async def announce():
            return await asyncio.gather(
                *(
                    e.update_weights_from_distributed(
                        names, dtypes, shapes, version, group_name=self.group_name
                    )
                    for e in self.engines
                ),
                return_exceptions=True,
            )

        replies = asyncio.run_coroutine_threadsafe(announce(), loop)
        for _, tensor in bucket:
            broadcast_from_trainer(self.group, tensor.detach().to(self.device).contiguous())
        for e, r in zip(self.engines, replies.result()):
            if isinstance(r, BaseException):
                logger.error("engine %s: weight bucket %s... failed: %s", e.engine_id, names[:1], r)

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Destroy the group (on the engines too when `loop` is given)."""
        if self.group is not None:
            self._destroy(loop)
