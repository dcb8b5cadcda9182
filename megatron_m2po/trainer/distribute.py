"""Moving Python objects (groups, metrics, log-probs) between rank 0 and the other trainer ranks.

Rank 0 owns the rollout side; every rank needs the consumed batch, and rank 0 needs the metrics that
only the last pipeline stage computes. Object collectives keep this short; the payload per step is
token ids and log-probs, small next to the weights. `SharedProducer` gives every rank the rollout side's
interface, so the loop never asks which rank it is on. A name ending in `_collective` (or a torch.distributed
verb: broadcast, gather) is a call every rank makes, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_m2po import platform
from megatron_m2po.platform import rank, world
from megatron_m2po.rollout.stops import ProducerStopped
from megatron_m2po.trainer.checkpointing import oldest_trainer_state
from megatron_m2po.types import Group


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=platform.device())
    return box[0]


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if world() == 1:
        return [obj]
    out = [None] * world() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_metrics_to_rank0(metrics: dict[str, float]) -> dict[str, float]:
    """Union of every rank's metrics on rank 0 (the last pipeline stage has the loss metrics)."""
    parts = gather_to_rank0(metrics)
    if parts is None:
        return {}
    merged: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            merged.setdefault(k, v)
    return merged


class SharedProducer:
    """The rollout side on every rank: rank 0 runs its `rollout.producer.Producer` (`local`); on the other ranks
    `local` is None and the methods that return data receive rank 0's answer by broadcast. The `_collective`
    methods are collectives; the rest act on rank 0 only."""

    def __init__(self, local=None):
        self.local = local
        self.farm = local.farm if local is not None else None  # the engines, for weight sync (rank 0)

    def _call_on_rank0_collective(self, call: Callable[[Any], Any], *, share_result: bool = True) -> Any:
        """`call(local)` on rank 0, its result on every rank (`share_result=False`: on rank 0 only, None
        elsewhere); a `ProducerStopped` there raises on every rank."""
        out = None
        if self.local is not None:
            try:
                out = call(self.local)
            except ProducerStopped as e:
                out = e
        shared = broadcast_from_rank0(out if share_result or isinstance(out, ProducerStopped) else None)
        if isinstance(shared, ProducerStopped):
            raise shared
        return shared if share_result else out

    def take_collective(
        self, num_groups: int, stop_requested: Callable[[], bool] = lambda: False
    ) -> list[Group] | None:
        """The next `num_groups` queued groups; None if rank 0's `stop_requested()` turns true first."""
        return self._call_on_rank0_collective(
            lambda producer: producer.take(num_groups, stop_requested=stop_requested)
        )

    def queued_collective(self) -> int:
        """Groups in rank 0's queue."""
        return self._call_on_rank0_collective(lambda producer: len(producer.queue))

    def generate_collective(self, num_groups: int, version: int, relabel: Callable[[list[Group] | None], None]) -> None:
        """Rank 0 generates `num_groups` groups with the engines at `version` and queues them; `relabel(groups)`
        runs on every rank in between (None off rank 0)."""
        groups = self._call_on_rank0_collective(
            lambda producer: producer.generate(num_groups, version), share_result=False
        )
        relabel(groups)
        if self.local is not None:
            self.local.put(groups)

    def generate_in_background(self, num_groups: int, version: int) -> None:
        """Rank 0 starts generating `num_groups` groups with the engines at `version` and returns at once; the
        other ranks do nothing. `join_generation_collective` queues them."""
        if self.local is not None:
            self.local.start_generation(num_groups, version)

    def join_generation_collective(self) -> float:
        """Wait for the batch `generate_in_background` started and queue it; its generation's wall
        time in seconds, from rank 0."""

        def finish(producer) -> float:
            producer.put(producer.finish_generation())
            return producer.last_generation_s

        return self._call_on_rank0_collective(finish)

    def start(self, version: int) -> None:
        if self.local is not None:
            self.local.start(version)

    def publish_version(self, version: int) -> None:
        if self.local is not None:
            self.local.queue.publish_version(version)

    def metrics(self) -> dict[str, float]:
        return self.local.metrics() if self.local is not None else {}

    def evaluate(self, version: int) -> dict[str, float]:
        return self.local.evaluate(version) if self.local is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """Rank 0's data position and queue commit point ({} elsewhere; the checkpoint broadcasts it)."""
        return self.local.state_dict() if self.local is not None else {}

    def checkpoint_saved(self, ckpt_root: Path) -> None:
        """Free the journal segments that the oldest kept checkpoint consumed (`--resume` may fall back to it)."""
        if self.local is None:
            return
        oldest = oldest_trainer_state(ckpt_root)
        if oldest is not None:
            self.local.queue.gc(oldest["queue"])

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
