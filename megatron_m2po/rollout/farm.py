"""Many engines behind one `generate`: least-loaded routing, retries, health checks, live membership.

Generation is at-least-once: a request whose engine fails, times out or dies is sent again to
another engine (the first attempt's result, if it ever arrives, is discarded). Acceptance is
exactly-once, by the replay queue's `put` keyed on prompt_id. Across a weight update, in-flight
requests either continue (tokens after the update record the new version: per-token staleness)
or are aborted and resubmitted on the new weights (`inflight_on_update="abort"`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from megatron_m2po.rollout.engines.base import Engine, EngineError, NamedTensors
from megatron_m2po.types import Sample, SamplingParams

logger = logging.getLogger(__name__)

INFLIGHT_POLICIES = ("continue", "abort")


class FarmError(RuntimeError):
    """No engine could serve a request within the allowed attempts."""


@dataclass
class _Slot:
    """Farm-side state of one engine."""

    engine: Engine
    healthy: bool = True
    synced: bool = True  # holds the farm's current weights
    draining: bool = False
    tasks: set[asyncio.Task] = field(default_factory=set)
    served: int = 0
    failures: int = 0

    @property
    def routable(self) -> bool:
        return self.healthy and self.synced and not self.draining


class EngineFarm:
    """Route `generate` calls to the least-loaded healthy engine; retry failures on another engine.

    `request_timeout` bounds one attempt (None: no bound); `max_attempts` bounds failed attempts per
    request (resubmissions caused by a weight-update abort do not count). `health_interval` seconds
    between background health checks once `start()` has been called.
    """

    def __init__(
        self,
        engines: Iterable[Engine],
        *,
        max_attempts: int = 3,
        request_timeout: float | None = None,
        health_interval: float = 10.0,
        inflight_on_update: str = "continue",
        no_engine_timeout: float = 60.0,
    ):
        if inflight_on_update not in INFLIGHT_POLICIES:
            raise ValueError(
                f"EngineFarm: inflight_on_update must be one of {INFLIGHT_POLICIES}, got {inflight_on_update!r}"
            )
        if max_attempts < 1:
            raise ValueError(f"EngineFarm: max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts, self.request_timeout = max_attempts, request_timeout
        self.health_interval, self.no_engine_timeout = health_interval, no_engine_timeout
        self.inflight_on_update = inflight_on_update
        self._aborted: set[asyncio.Task] = set()
        self._update_done: asyncio.Event | None = None
        self._membership: asyncio.Event | None = None
        self._health_task: asyncio.Task | None = None
        self._targets: list[_Slot] = []
        self._counts = {"requests": 0, "retries": 0, "failures": 0, "timeouts": 0, "resubmitted": 0}
        self._overhead_s = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop it runs in (set by RolloutManager)
        self._slots: dict[str, _Slot] = {}
        engines = list(engines)
        if not engines:
            raise ValueError("EngineFarm: needs at least one engine")
        self._version = max(e.version for e in engines)  # engines behind it wait for the next update
        for engine in engines:
            self.add_engine(engine)

    # -- membership ------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @property
    def engines(self) -> list[Engine]:
        return [s.engine for s in self._slots.values()]

    def add_engine(self, engine: Engine) -> None:
        """Add an engine at run time; it takes requests once it holds the farm's weight version."""
        if engine.engine_id in self._slots:
            raise ValueError(f"EngineFarm: an engine with id {engine.engine_id!r} is already in the farm")
        slot = _Slot(engine, synced=engine.version == self._version)
        if not slot.synced:
            logger.info(
                "engine %s (v%d) joins; waits for the next weight update (farm at v%d)",
                engine.engine_id,
                engine.version,
                self._version,
            )
        self._slots[engine.engine_id] = slot
        self._notify_membership()

    async def remove_engine(self, engine_id: str, *, drain: bool = True, close: bool = True) -> Engine:
        """Stop routing to an engine; drain=True lets its requests finish, False resubmits them elsewhere."""
        slot = self._slots.get(engine_id)
        if slot is None:
            raise KeyError(f"EngineFarm: no engine {engine_id!r} (have {sorted(self._slots)})")
        slot.draining = True
        if drain:
            while slot.tasks:
                await asyncio.wait(set(slot.tasks))
        else:
            self._abort_tasks(slot)
        del self._slots[engine_id]
        if close:
            await slot.engine.close()
        return slot.engine

    def _abort_tasks(self, slot: _Slot) -> None:
        """Cancel the slot's requests; `generate` resubmits them elsewhere (not counted as failures)."""
        for task in list(slot.tasks):
            self._aborted.add(task)
            task.cancel()

    def _notify_membership(self) -> None:
        if self._membership is not None:
            self._membership.set()

    # -- routing ---------------------------------------------------------------------------------------
    def _pick(self, exclude: set[str]) -> _Slot | None:
        candidates = [s for s in self._slots.values() if s.routable and s.engine.engine_id not in exclude]
        if not candidates:  # every healthy engine already failed this request: allow a second try on them
            candidates = [s for s in self._slots.values() if s.routable]
        return min(candidates, key=lambda s: (len(s.tasks), s.served), default=None)

    async def _wait_for_engine(self, exclude: set[str], prompt_id: str) -> _Slot:
        deadline = time.monotonic() + self.no_engine_timeout
        while True:
            slot = self._pick(exclude)
            if slot is not None:
                return slot
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FarmError(
                    f"request {prompt_id}: no healthy engine for {self.no_engine_timeout}s (engines: {self.describe()})"
                )
            if self._membership is None:
                self._membership = asyncio.Event()
            self._membership.clear()
            if self._health_task is None:  # nobody else will mark engines healthy again
                await self.check_health()
                if self._pick(exclude) is not None:
                    continue
            try:
                await asyncio.wait_for(self._membership.wait(), timeout=min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass

    async def generate(
        self, prompt_id: str, prompt_ids: list[int], n: int, params: SamplingParams
    ) -> list[Sample]:
        """n samples for one prompt from some engine; retried elsewhere on failure (at-least-once)."""
        t_enter = time.perf_counter()
        self._counts["requests"] += 1
        tried: set[str] = set()
        failures, resubmits = 0, 0
        last_error: BaseException | None = None
        while failures < self.max_attempts:
            if (
                self._update_done is not None
                and not self._update_done.is_set()
                and self.inflight_on_update == "abort"
            ):
                await self._update_done.wait()
            slot = await self._wait_for_engine(tried, prompt_id)
            engine = slot.engine
            task = asyncio.ensure_future(engine.generate(prompt_id, prompt_ids, n, params))
            slot.tasks.add(task)
            t_sent = time.perf_counter()
            try:
                done, _ = await asyncio.wait({task}, timeout=self.request_timeout)
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                slot.tasks.discard(task)
            t_back = time.perf_counter()
            if not done:
                task.cancel()
                self._counts["timeouts"] += 1
                last_error = TimeoutError(
                    f"engine {engine.engine_id} gave no reply within {self.request_timeout}s"
                )
            elif task.cancelled():
                if task in self._aborted:  # aborted by the farm (weight update / removal): not a failure
                    self._aborted.discard(task)
                    self._counts["resubmitted"] += 1
                    resubmits += 1
                    continue
                last_error = EngineError(f"engine {engine.engine_id}: request cancelled by the engine")
            elif task.exception() is not None:
                err = task.exception()
                if isinstance(err, (ValueError, TypeError)):
                    raise err  # a bad request fails everywhere: do not retry
                last_error = err
            else:
                samples = task.result()
                if any(s.finish_reason == "abort" for s in samples) and resubmits < 2 * self.max_attempts:
                    self._counts["resubmitted"] += 1
                    resubmits += 1
                    continue
                slot.served += 1
                self._overhead_s += (t_sent - t_enter) + (time.perf_counter() - t_back)
                return samples
            failures += 1
            tried.add(engine.engine_id)
            slot.failures += 1
            if engine.engine_id in self._slots:
                slot.healthy = False
            self._counts["failures"] += 1
            if failures < self.max_attempts:
                self._counts["retries"] += 1
            logger.warning(
                "request %s failed on engine %s (attempt %d/%d): %s",
                prompt_id,
                engine.engine_id,
                failures,
                self.max_attempts,
                last_error,
            )
        raise FarmError(
            f"request {prompt_id}: failed on {failures} attempts (engines tried: {sorted(tried)}); "
            f"last error: {last_error}"
        ) from last_error

    # -- health ----------------------------------------------------------------------------------------
    async def check_health(self) -> dict[str, bool]:
        slots = list(self._slots.values())
        results = await asyncio.gather(*(s.engine.health() for s in slots), return_exceptions=True)
        status = {}
        for slot, ok in zip(slots, results):
            ok = ok is True
            if ok != slot.healthy:
                logger.info("engine %s is now %s", slot.engine.engine_id, "healthy" if ok else "unhealthy")
            slot.healthy = ok
            updating = self._update_done is not None and not self._update_done.is_set()
            if (  # e.g. a restarted server's start-up weights; mid-update an engine is already ahead
                slot.synced and slot.engine.version != self._version and not updating
            ):
                logger.warning(
                    "engine %s serves v%d, the farm v%d: out of rotation until an update reaches it",
                    slot.engine.engine_id,
                    slot.engine.version,
                    self._version,
                )
                slot.synced = False
            status[slot.engine.engine_id] = ok
        self._notify_membership()
        return status

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_health()
            except Exception:  # never let a health probe take the loop down
                logger.exception("health check failed")

    def start(self) -> None:
        """Start periodic health checks in the running event loop."""
        if self._health_task is None:
            self._health_task = asyncio.ensure_future(self._health_loop())

    # -- weight updates --------------------------------------------------------------------------------
    def _update_targets(self) -> list[_Slot]:
        return [s for s in self._slots.values() if s.healthy and not s.draining]

    async def _each(self, slots: list[_Slot], what: str, make_call) -> None:
        if not slots:
            raise EngineError(
                f"{what}: no engine to send it to (every engine is unhealthy or draining: {self.describe()})"
            )
        results = await asyncio.gather(*(make_call(s.engine) for s in slots), return_exceptions=True)
        for slot, result in zip(slots, results):
            if isinstance(result, BaseException):
                logger.error(
                    "engine %s: %s failed (%s); it leaves rotation until a later update reaches it",
                    slot.engine.engine_id,
                    what,
                    result,
                )
                slot.synced = False
        if all(isinstance(r, BaseException) for r in results):
            raise EngineError(f"{what} failed on every engine: {results[0]}")

    def _start_update(self) -> list[_Slot]:
        """Hold new requests (abort policy), abort in-flight ones if asked; returns the engines to update."""
        if self._update_done is None:
            self._update_done = asyncio.Event()
        self._update_done.clear()
        targets = self._update_targets()
        if self.inflight_on_update == "abort":
            for slot in self._slots.values():
                self._abort_tasks(slot)
        return targets

    def _end_update(self, targets: list[_Slot], version: int) -> None:
        """The farm serves `version`; engines that did not reach it leave rotation until a later update."""
        self._version = version
        for slot in targets:
            slot.synced = slot.engine.version == version
        self._update_done.set()
        self._notify_membership()

    async def begin_weight_update(self, version: int) -> None:
        self._targets = self._start_update()
        await self._each(
            self._targets, f"begin update to v{version}", lambda e: e.begin_weight_update(version)
        )

    async def update_weights_bucket(self, named_tensors: NamedTensors) -> None:
        bucket = list(named_tensors)  # every engine reads the same bucket
        await self._each(self._targets, "weight bucket", lambda e: e.update_weights_bucket(bucket))

    async def finish_weight_update(self, version: int) -> None:
        try:
            await self._each(
                self._targets, f"finish update to v{version}", lambda e: e.finish_weight_update(version)
            )
        finally:
            self._end_update(self._targets, version)

    async def discard_weight_update(self, reason: str) -> None:
        """The sender gave the update up: every engine ends it without the new version (engine docs say
        how); the farm's version stays."""
        try:
            await self._each(self._targets, "discard update", lambda e: e.discard_weight_update(reason))
        finally:
            self._end_update(self._targets, self._version)

    update_weights = Engine.update_weights  # begin, one bucket, finish: the same sequence as one engine's

    async def update_weights_from_disk(self, hf_dir: str, version: int) -> None:
        """Every engine loads the HF dir (SGLang /update_weights_from_disk, LocalEngine in process)."""
        targets = self._start_update()
        try:
            await self._each(
                targets,
                f"update from disk to v{version}",
                lambda e: e.update_weights_from_disk(hf_dir, version),
            )
        finally:
            self._end_update(targets, version)

    # -- reporting -------------------------------------------------------------------------------------
    def describe(self) -> str:
        return ", ".join(
            f"{i}(v{s.engine.version}{'' if s.healthy else ' unhealthy'}{'' if s.synced else ' unsynced'}"
            f"{' draining' if s.draining else ''}, {len(s.tasks)} in flight)"
            for i, s in self._slots.items()
        )

    def metrics(self) -> dict[str, float]:
        served = max(sum(s.served for s in self._slots.values()), 1)
        return {
            "rollout/farm_requests": float(self._counts["requests"]),
            "rollout/farm_retries": float(self._counts["retries"]),
            "rollout/farm_failures": float(self._counts["failures"]),
            "rollout/farm_timeouts": float(self._counts["timeouts"]),
            "rollout/farm_resubmitted": float(self._counts["resubmitted"]),
            "rollout/engines_healthy": float(sum(s.routable for s in self._slots.values())),
            "rollout/engines": float(len(self._slots)),
            "rollout/inflight": float(sum(len(s.tasks) for s in self._slots.values())),
            "rollout/farm_overhead_ms": 1000.0 * self._overhead_s / served,
        }

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        await asyncio.gather(*(s.engine.close() for s in self._slots.values()), return_exceptions=True)
