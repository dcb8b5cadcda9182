"""Trainer side of the distributed weight update: metadata over HTTP, tensors by broadcast from rank 0.

The update group holds the trainer (rank 0) and every GPU of every member engine: an SGLang server joins
with `tp_size` ranks (read from its /server_info), at rank_offset + tp_rank. Per bucket every member gets
`/update_weights_from_distributed` {names, dtypes, shapes} and starts receiving; meanwhile the trainer
broadcasts each tensor, in that order (NCCL on GPU; gloo works too, which is how the CPU tests run the same
protocol against our local server). Membership is fixed per group, so when the engines able to take an
update change (one joined the farm after the start, or one is down), the group is destroyed on both
sides and created again under a new name and port.

A member that dies or hangs mid-push must not hang the trainer: every bucket's broadcast and every member's
reply is bounded by `timeout` seconds. A member that fails its bucket and does not answer its health check
is dropped (so is one that answers but took no part in a broadcast that broke): the trainer aborts its
side of the group (NCCL: the communicator is aborted; gloo: destroyed, which also ends the survivors'
pending receives at once), the survivors leave it and form a new group under a new name, and the push goes
on with them, sending the bucket again when its broadcast broke. `send_bucket` returns the dropped engines
so the caller takes them out of the update and rotation.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_m2po import platform
from megatron_m2po.net import free_port
from megatron_m2po.sync.process_group import abort_group, broadcast_from_trainer, new_weight_update_group

logger = logging.getLogger(__name__)


class EngineGroupLost(RuntimeError):
    """No engine of the weight-update group is left to receive the push."""


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
        timeout: float = 300.0,
    ):
        if not timeout > 0:
            raise ValueError(f"DistributedWeightBroadcaster: timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout  # seconds: each bucket's broadcast, each member's reply, forming a group
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
        if self.group is not None:
            self._destroy(loop)
        if engines is not None:
            self.engines = self._check(engines)
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
            self.master_address,
            port,
            0,
            self.world_size,
            self.group_name,
            self.backend,
            timeout=timedelta(seconds=self.timeout),
        )
        joined.result(timeout=self.timeout)
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
        self._leave(loop, self.engines)
        dist.destroy_process_group(self.group)
        self.group = None

    def _leave(self, loop: asyncio.AbstractEventLoop | None, engines: Sequence) -> None:
        """`engines` destroy their side of the current group, each within `timeout` seconds."""
        if loop is None or not loop.is_running() or not engines:
            return

        async def leave():
            return await asyncio.gather(
                *(
                    asyncio.wait_for(e.destroy_weights_update_group(self.group_name), self.timeout)
                    for e in engines
                ),
                return_exceptions=True,
            )

        results = asyncio.run_coroutine_threadsafe(leave(), loop).result()
        for e, r in zip(engines, results):
            if isinstance(r, BaseException):
                logger.warning("engine %s: leaving group %s failed: %r", e.engine_id, self.group_name, r)

    def send_bucket(
        self, bucket: list[tuple[str, torch.Tensor]], version: int, loop: asyncio.AbstractEventLoop
    ) -> list:
        """Announce the bucket to every member and broadcast it; returns the members dropped from the group.

        An engine that answers with a failure while the broadcast completed has still received the tensors; if
        it answers its health check it stays (it reports the failure when the update finishes and leaves
        rotation). One that is not answering is dropped and the group rebuilt for the others; if the broadcast
        itself broke, the survivors get the whole bucket again on the new group (module docstring)."""
        if self.group is None:
            raise RuntimeError("DistributedWeightBroadcaster.send_bucket before connect()")
        names = [n for n, _ in bucket]
        dropped: list = []
        while True:
            members = list(self.engines)
            replies = [
                asyncio.run_coroutine_threadsafe(self._announce(m, bucket, version), loop) for m in members
            ]

            def refused(members=members, replies=replies) -> str | None:
                """A member whose reply failed while the broadcast runs will not take part (it refused the
                bucket, or its connection broke): waiting for the broadcast would only run into the timeout."""
                failed = [m.engine_id for m, r in zip(members, replies) if r.done() and r.exception()]
                return f"{failed} failed their bucket" if failed else None

            broken: Exception | None = None
            try:
                for _, tensor in bucket:
                    broadcast_from_trainer(
                        self.group,
                        tensor.detach().to(self.device).contiguous(),
                        timeout=self.timeout,
                        give_up=refused,
                    )
            except Exception as e:  # noqa: BLE001 (a member died, hung or refused: found below by its reply)
                broken = e.with_traceback(None)  # its frames would keep the group, and its sockets, alive
            early = [m for m, r in zip(members, replies) if r.done() and r.exception()]
            if broken is not None:  # members still receiving this bucket fail once the group's sockets close
                self._abort(stuck=isinstance(broken, TimeoutError))
            results = []
            for r in replies:  # after the broadcast (or its abort) every live member answers promptly
                try:
                    results.append(r.result(timeout=self.timeout))
                except Exception as e:  # noqa: BLE001 (a member's failure, or no reply within the bound)
                    r.cancel()
                    results.append(e)
            failed = [m for m, r in zip(members, results) if isinstance(r, BaseException)]
            for m, r in zip(members, results):
                if isinstance(r, BaseException):
                    logger.error("engine %s: weight bucket %s... failed: %r", m.engine_id, names[:1], r)
            gone = self._not_answering(failed, loop)
            if broken is not None:  # those that failed before it broke never took part (refused, or dead)
                gone += [m for m in early if m not in gone]
                if not gone:
                    raise RuntimeError(
                        f"weight broadcast of {names[:1]}... failed while every engine took part: {broken}"
                    ) from broken
            if not gone:
                return dropped
            dropped += gone
            self._rebuild_without(gone, loop, broken)
            if broken is None:  # every survivor received this bucket
                return dropped

    async def _announce(self, member, bucket: list[tuple[str, torch.Tensor]], version: int) -> None:
        """One member's /update_weights_from_distributed for the bucket (it then receives the broadcast)."""
        names = [n for n, _ in bucket]
        dtypes = [dtype_name(t.dtype) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        await member.update_weights_from_distributed(
            names, dtypes, shapes, version, group_name=self.group_name
        )

    def _not_answering(self, engines: list, loop: asyncio.AbstractEventLoop) -> list:
        """The engines among `engines` whose health check fails within `timeout` seconds."""
        if not engines:
            return []

        async def probe():
            return await asyncio.gather(
                *(asyncio.wait_for(e.health(), self.timeout) for e in engines), return_exceptions=True
            )

        results = asyncio.run_coroutine_threadsafe(probe(), loop).result()
        return [e for e, ok in zip(engines, results) if ok is not True]

    def _abort(self, stuck: bool = False) -> None:
        if self.group is not None:
            abort_group(self.group, self.backend, stuck=stuck, timeout=self.timeout)
            self.group = None

    def _rebuild_without(self, gone: list, loop: asyncio.AbstractEventLoop, broken: Exception | None) -> None:
        """Abort the trainer's side of the group, let the survivors leave it, form a new one with them."""
        survivors = [e for e in self.engines if e not in gone]
        logger.error(
            "weight-update group %s: dropping %s (dead, hung or refusing%s); rebuilding it for %s",
            self.group_name,
            [e.engine_id for e in gone],
            f"; the broadcast broke: {broken}" if broken else "",
            [e.engine_id for e in survivors],
        )
        self._abort()
        self._leave(loop, survivors)
        for e in gone:
            e.needs_new_group = True  # it left the group with its old process or state
        if not survivors:
            self.engines = []
            raise EngineGroupLost(
                f"weight push: no engine of the update group is left ({[e.engine_id for e in gone]} failed)"
            )
        self.connect(loop, survivors)

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Destroy the group (on the engines too when `loop` is given)."""
        if self.group is not None:
            self._destroy(loop)
