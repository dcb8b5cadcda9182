"""WeightSync: the trainer's current policy -> every engine, as HF-named tensors, and a version bump.

`push_collective(version)` is collective over the model-parallel ranks (checkpoint.iter_hf_tensors gathers TP/PP
shards); the rank holding the rollout side (global rank 0) streams buckets of at most `bucket_bytes`
to the engines, the others only take part in the gather. Transports:
- "tensors": in-process engines (LocalEngine, CPU) copy each bucket into their weights;
- "distributed": SGLang-style update group, NCCL broadcast from the trainer (GPU);
- "disk": write an HF safetensors dir, engines load it (/update_weights_from_disk).
Engines pause for the update; in-flight requests continue or are aborted per the farm's policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_m2po.checkpoint import iter_hf_tensors
from megatron_m2po.event_loop import LoopThread
from megatron_m2po.sync.buckets import iter_buckets, tensor_bytes

logger = logging.getLogger(__name__)

TRANSPORTS = ("tensors", "distributed", "disk")


class WeightSync:
    """`target`: an EngineFarm, a list of engines, or None on ranks that only join the gather."""

    def __init__(
        self,
        model,
        hf_config,
        target=None,
        *,
        bucket_bytes: int = 256 << 20,
        transport: str = "tensors",
        broadcaster=None,
        disk_dir: str | Path | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        if transport not in TRANSPORTS:
            raise ValueError(f"WeightSync: transport must be one of {TRANSPORTS}, got {transport!r}")
        if transport == "distributed" and target is not None and broadcaster is None:
            raise ValueError("WeightSync: transport='distributed' needs a DistributedWeightBroadcaster")
        if transport == "disk" and target is not None and disk_dir is None:
            raise ValueError("WeightSync: transport='disk' needs disk_dir")
        self.model, self.hf_config, self.bucket_bytes, self.transport = (
            model,
            hf_config,
            bucket_bytes,
            transport,
        )
        self.broadcaster, self.disk_dir = broadcaster, Path(disk_dir) if disk_dir else None
        self.target = target
        self._own_loop: LoopThread | None = None
        self.loop = loop or getattr(target, "loop", None)
        if target is not None and self.loop is None:
            self._own_loop = LoopThread("weight-sync")
            self.loop = self._own_loop.loop
        self.last: dict[str, float] = {}
        self._dropped: set[str] = set()  # engine ids dropped from the push in progress
        self._pushed: int | None = None  # the newest version written to disk_dir

    # -- engine calls, in the rollout loop -------------------------------------------------------------
    def _engines(self) -> list:
        return list(self.target.engines) if hasattr(self.target, "engines") else list(self.target)

    def _is_farm(self) -> bool:
        return not isinstance(self.target, (list, tuple))

    def _call(self, method: str, *args):
        """Call `method` on the farm, or on every engine of a list (but those dropped from this push), in the
        rollout loop; wait for it."""
        if hasattr(self.target, method) and self._is_farm():
            coro = getattr(self.target, method)(*args)
        else:

            async def each():
                await asyncio.gather(
                    *(getattr(e, method)(*args) for e in self.target if e.engine_id not in self._dropped)
                )

            coro = each()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _updating(self) -> list:
        """The engines this push still goes to (a farm drops those that failed or timed out on a step)."""
        if self._is_farm() and hasattr(self.target, "updating"):
            return list(self.target.updating)
        return [e for e in self._engines() if e.engine_id not in self._dropped]

    def _leave_update(self, dropped: list) -> None:
        """Engines the broadcaster dropped (dead or hung mid-push): no finish for them, out of rotation."""
        ids = [e.engine_id for e in dropped]
        self._dropped.update(ids)
        if self._is_farm() and hasattr(self.target, "leave_update"):
            self._call("leave_update", ids, "dropped from the weight-update group mid-push (dead or hung)")

    def _receivers(self) -> list:
        """Distributed transport: the engines whose update session opened; the group is rebuilt when they are
        not its members (an engine joined after the start, or one is down). Engines left out report the
        missed update in finish_weight_update and stay out of rotation until a later one reaches them."""
        if self.transport != "distributed":
            return []
        receivers = [e for e in self._updating() if getattr(e, "update_open", False)]
        if receivers:
            self.broadcaster.ensure_members(receivers, self.loop)
        else:
            logger.error("weight update: no engine opened an update session; nothing is broadcast")
        return receivers

    # -- push ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def push_collective(self, version: int) -> dict[str, float]:
        """Send the current weights as `version` to every engine; returns sync/ metrics (on the sending rank)."""
        t0 = time.perf_counter()
        tensors = iter_hf_tensors(self.model, self.hf_config)
        sending = self.target is not None
        if not sending:
            for _ in tensors:  # take part in the collective gather only
                pass
            return {}
        if dist.is_initialized() and dist.get_rank() != 0:
            logger.warning(
                "WeightSync.push_collective with engines on global rank %d (expected rank 0)", dist.get_rank()
            )
        n_bytes = n_buckets = n_dropped = 0
        if self.transport == "disk":
            n_bytes, n_buckets = self._write_hf_dir(tensors, version)
            self._call("update_weights_from_disk", str(self._version_dir(version)), version)
            self._pushed = version
            if hasattr(self.target, "catch_up"):  # a restarted engine loads the newest dir at once
                self.target.catch_up = self._catch_up_from_disk
        else:
            self._dropped = set()
            self._call("begin_weight_update", version)
            try:
                receivers = self._receivers()
                for bucket in iter_buckets(tensors, self.bucket_bytes):
                    n_bytes += sum(tensor_bytes(t) for _, t in bucket)
                    n_buckets += 1
                    if self.transport == "tensors":
                        self._call("update_weights_bucket", bucket)
                    elif receivers:
                        dropped = self.broadcaster.send_bucket(bucket, version, self.loop)
                        if dropped:
                            self._leave_update(dropped)
                            n_dropped += len(dropped)
            except BaseException as e:  # part of the weights went out: the engines must not publish them
                try:
                    self._call("discard_weight_update", f"{type(e).__name__}: {e}")
                except Exception as discard_error:  # noqa: BLE001 (the first failure is the one to raise)
                    logger.error("weights v%d: discarding the update failed too: %s", version, discard_error)
                raise
            self._call("finish_weight_update", version)
        seconds = time.perf_counter() - t0
        self.last = {
            "sync/seconds": seconds,
            "sync/bytes": float(n_bytes),
            "sync/buckets": float(n_buckets),
            "sync/gbytes_per_s": n_bytes / max(seconds, 1e-9) / 1e9,
            "sync/version": float(version),
            "sync/engines_dropped": float(n_dropped),
        }
        # one per update: DEBUG (--verbose), the figures are the step's sync/ scalars in TensorBoard
        logger.debug(
            "weights v%d -> %d engines: %.1f MB in %d buckets, %.2fs",
            version,
            len(self._engines()),
            n_bytes / 1e6,
            n_buckets,
            seconds,
        )
        return self.last

    async def _catch_up_from_disk(self, engine) -> None:
        """Load the newest pushed version into one engine (the farm calls it for a restarted server)."""
        version = self._pushed
        await engine.update_weights_from_disk(str(self._version_dir(version)), version)

    def _version_dir(self, version: int) -> Path:
        return self.disk_dir / f"v{version}"

    def _write_hf_dir(self, tensors, version: int) -> tuple[int, int]:
        """Write an HF dir (config + one safetensors shard per bucket) that engines load by path."""
        out = self._version_dir(version)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.hf_config.to_json_file(tmp / "config.json")
        index, n_bytes, n = {}, 0, 0
        for n, bucket in enumerate(iter_buckets(tensors, self.bucket_bytes), start=1):
            shard = f"model-{n:05d}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in bucket}, tmp / shard)
            index.update({k: shard for k, _ in bucket})
            n_bytes += sum(tensor_bytes(t) for _, t in bucket)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": n_bytes}, "weight_map": index})
        )
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        old = self._version_dir(version - 1)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        return n_bytes, n

    def close(self) -> None:
        if self.broadcaster is not None:
            self.broadcaster.close(self.loop)
        if self._own_loop is not None:
            self._own_loop.stop()
