"""Moving Python objects (groups, metrics, log-probs) between rank 0 and the other trainer ranks.

Rank 0 owns the rollout side; every rank needs the consumed batch, and rank 0 needs the metrics that
only the last pipeline stage computes. Object collectives keep this short; the payload per step is
token ids and log-probs, small next to the weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if world() == 1:
        return [obj]
    out = [None] * world() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def merge_metrics_to_rank0(metrics: dict[str, float]) -> dict[str, float]:
    """Union of every rank's metrics on rank 0 (the last pipeline stage has the loss metrics)."""
    parts = gather_to_rank0(metrics)
    if parts is None:
        return {}
    merged: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            merged.setdefault(k, v)
    return merged
