"""Many engines behind one `generate`: least-loaded routing, retries, health checks, live membership.

Generation is at-least-once: a request whose engine fails, times out or dies is sent again to
another engine (the first attempt's result, if it ever arrives, is discarded). Acceptance is
exactly-once, by the replay queue's `put` keyed on prompt_id. Across a weight update, in-flight
requests either continue (tokens after the update record the new version: per-token staleness)
or are aborted and resubmitted on the new weights (`inflight_on_update="abort"`).

Rotation: an engine leaves it after `max_engine_failures` consecutive failed or timed-out requests, a
failed health check, or a weight update it did not complete (dead, hung past `update_timeout`, or dropped
from the update group); a health check that finds it answering brings it back (after a missed update, only
once a later update reaches it). An engine that misses `max_engine_failures` health checks in a row is
taken to be hung: its requests in flight are resubmitted elsewhere instead of waiting `request_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from megatron_m2po.rollout.engines.base import Engine, EngineError, NamedTensors
from megatron_m2po.types import Sample, SamplingParams

logger = logging.getLogger(__name__)

INFLIGHT_POLICIES = ("continue", "abort")


class FarmError(RuntimeError):
    """No engine could serve a request within the allowed attempts."""


class UpdateTimeout(EngineError):
    """An engine did not finish its part of a weight-update step within the farm's update_timeout."""


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
    failures_in_a_row: int = 0  # failed requests since its last success or return to rotation
    missed_health_checks: int = 0  # in a row
    out_since: float | None = None  # when it left rotation (seen at the farm's last look)
    catching_up: bool = False  # loading the farm's weights outside an update (`EngineFarm.catch_up`)

    @property
    def routable(self) -> bool:
        return self.healthy and self.synced and not self.draining and not self.catching_up


class EngineFarm:
    """Route `generate` calls to the least-loaded healthy engine; retry failures on another engine.

    `request_timeout` bounds one attempt (None: no bound); `max_attempts` bounds failed attempts per
    request (resubmissions caused by a weight-update abort do not count). `health_interval` seconds
    between background health checks once `start()` has been called. `max_engine_failures`: failed
    requests (or missed health checks) in a row that take an engine out of rotation. `update_timeout`
    bounds each engine's part of each weight-update step (None: no bound).
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
        max_engine_failures: int = 3,
        update_timeout: float | None = None,
    ):
        if inflight_on_update not in INFLIGHT_POLICIES:
            raise ValueError(
                f"EngineFarm: inflight_on_update must be one of {INFLIGHT_POLICIES}, got {inflight_on_update!r}"
            )
        if max_attempts < 1:
            raise ValueError(f"EngineFarm: max_attempts must be >= 1, got {max_attempts}")
        if max_engine_failures < 1:
            raise ValueError(f"EngineFarm: max_engine_failures must be >= 1, got {max_engine_failures}")
        self.max_attempts, self.request_timeout = max_attempts, request_timeout
        self.max_engine_failures, self.update_timeout = max_engine_failures, update_timeout
        self.health_interval, self.no_engine_timeout = health_interval, no_engine_timeout
        self.inflight_on_update = inflight_on_update
        self._aborted: set[asyncio.Task] = set()
        self._update_done: asyncio.Event | None = None
        self._membership: asyncio.Event | None = None
        self._health_task: asyncio.Task | None = None
        self._targets: list[_Slot] = []
        self._counts = {
            "requests": 0,
            "retries": 0,
            "failures": 0,
            "timeouts": 0,
            "resubmitted": 0,
            "out_of_rotation": 0,  # times an engine left rotation (failures, health, a missed update)
            "update_dropped": 0,  # engines dropped from a weight update (dead, hung, or failed)
        }
        self._overhead_s = 0.0
        self._out_of_rotation_s = 0.0  # engine-seconds out of rotation, up to each slot's out_since
        # Set by the weight sync once it has pushed a version: brings one engine that lags the farm (a restarted
        # server) to the farm's version now, instead of at the next update (e.g. from the last HF dir on disk).
        self.catch_up: Callable[[Engine], Awaitable[None]] | None = None
        self._catch_ups: set[asyncio.Task] = set()
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
                slot.failures_in_a_row = 0
                self._overhead_s += (t_sent - t_enter) + (time.perf_counter() - t_back)
                return samples
            failures += 1
            tried.add(engine.engine_id)
            slot.failures += 1
            slot.failures_in_a_row += 1
            if slot.failures_in_a_row >= self.max_engine_failures and engine.engine_id in self._slots:
                self._leave_rotation(slot, f"{slot.failures_in_a_row} failed requests in a row")
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
            if ok and not slot.healthy:
                logger.info("engine %s answers its health check: back in rotation", slot.engine.engine_id)
                slot.healthy, slot.failures_in_a_row = True, 0
            elif not ok:
                self._leave_rotation(slot, "failed its health check")
            slot.missed_health_checks = 0 if ok else slot.missed_health_checks + 1
            if slot.missed_health_checks == self.max_engine_failures and slot.tasks:
                logger.warning(
                    "engine %s missed %d health checks in a row: taken as hung, its %d requests go elsewhere",
                    slot.engine.engine_id,
                    slot.missed_health_checks,
                    len(slot.tasks),
                )
                self._abort_tasks(slot)
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
            if ok and not slot.synced and self.catch_up is not None and not updating and not slot.catching_up:
                slot.catching_up = True
                task = asyncio.ensure_future(self._catch_up(slot))
                self._catch_ups.add(task)
                task.add_done_callback(self._catch_ups.discard)
        self._rotation_clock()
        self._notify_membership()
        return status

    async def _catch_up(self, slot: _Slot) -> None:
        """Bring a healthy engine that lags the farm (restarted: start-up weights) to the farm's version; it
        takes requests again only once it holds that version."""
        engine, version = slot.engine, self._version
        try:
            await self._bounded(engine, f"catch-up to v{version}", self.catch_up(engine))
        except Exception as e:  # noqa: BLE001 (any failure: the next health check tries again)
            logger.warning("engine %s: catching up to v%d failed: %s", engine.engine_id, version, e)
        else:
            updating = self._update_done is not None and not self._update_done.is_set()
            slot.synced = engine.version == self._version and not updating
            if slot.synced:
                logger.warning(
                    "engine %s holds the farm's v%d again: back in rotation", engine.engine_id, version
                )
        finally:
            slot.catching_up = False
            self._rotation_clock()
            self._notify_membership()

    def _rotation_clock(self) -> None:
        """Account the engines' time out of rotation (at each health check, update and metrics call)."""
        now = time.monotonic()
        for slot in self._slots.values():
            if not slot.routable and slot.out_since is None:
                slot.out_since = now
            elif slot.routable and slot.out_since is not None:
                self._out_of_rotation_s += now - slot.out_since
                slot.out_since = None

    def _leave_rotation(self, slot: _Slot, why: str) -> None:
        if slot.healthy:
            logger.warning("engine %s leaves rotation: %s", slot.engine.engine_id, why)
            self._counts["out_of_rotation"] += 1
        slot.healthy = False
        self._rotation_clock()

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
        """Engines catching up are left out: one load at a time; a version they miss is caught up next."""
        return [s for s in self._slots.values() if s.healthy and not s.draining and not s.catching_up]

    async def _bounded(self, engine: Engine, what: str, call) -> None:
        """One engine's part of an update step, for at most `update_timeout` seconds."""
        try:
            await asyncio.wait_for(call, self.update_timeout)
        except asyncio.TimeoutError:
            raise UpdateTimeout(
                f"engine {engine.engine_id}: {what} took more than {self.update_timeout}s (hung?)"
            ) from None

    async def _each(self, slots: list[_Slot], what: str, make_call) -> None:
        """Run an update step on every engine; one that fails leaves rotation until a later update reaches
        it, one that timed out also leaves this update (it gets no further steps)."""
        slots = list(slots)  # a timed-out engine is removed from the update's targets below
        # e.g. one engine restarting while the other's probe timed out: both catch up once they answer
        if not slots:
            logger.error(
                "%s: no engine to send it to (every engine is unhealthy or draining: %s); the farm moves on "
                "and each engine takes the weights when it answers again (from disk, or the next update)",
                what,
                self.describe(),
            )
            return
        results = await asyncio.gather(
            *(self._bounded(s.engine, what, make_call(s.engine)) for s in slots), return_exceptions=True
        )
        for slot, result in zip(slots, results):
            if isinstance(result, BaseException):
                logger.error(
                    "engine %s: %s failed (%s); it leaves rotation until a later update reaches it",
                    slot.engine.engine_id,
                    what,
                    result,
                )
                slot.synced = False
                if isinstance(result, UpdateTimeout):
                    self._drop_from_update(slot, str(result))
        if all(isinstance(r, BaseException) for r in results):
            raise EngineError(f"{what} failed on every engine: {results[0]}")

    def _drop_from_update(self, slot: _Slot, why: str) -> None:
        """The engine gets no further steps of this update and leaves rotation; its requests go elsewhere."""
        if slot in self._targets:
            self._targets.remove(slot)
            self._counts["update_dropped"] += 1
        slot.synced = False
        self._leave_rotation(slot, why)
        self._abort_tasks(slot)

    @property
    def updating(self) -> list[Engine]:
        """The engines the weight update in progress still goes to."""
        return [s.engine for s in self._targets]

    async def leave_update(self, engine_ids: Iterable[str], reason: str) -> None:
        """The sender dropped these engines from the update (dead or hung in the broadcast): they get no
        finish, leave rotation, and their requests are resubmitted elsewhere."""
        for engine_id in engine_ids:
            slot = self._slots.get(engine_id)
            if slot is not None:
                self._drop_from_update(slot, reason)

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
        self._rotation_clock()
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
        self._rotation_clock()
        now = time.monotonic()
        served = max(sum(s.served for s in self._slots.values()), 1)
        return {
            "rollout/farm_requests": float(self._counts["requests"]),
            "rollout/farm_retries": float(self._counts["retries"]),
            "rollout/farm_failures": float(self._counts["failures"]),
            "rollout/farm_timeouts": float(self._counts["timeouts"]),
            "rollout/farm_resubmitted": float(self._counts["resubmitted"]),
            "rollout/engines_healthy": float(sum(s.routable for s in self._slots.values())),
            "rollout/engines_up": float(sum(s.healthy for s in self._slots.values())),
            "rollout/engine_restarts": float(
                sum(getattr(s.engine, "restarts_seen", 0) for s in self._slots.values())
            ),
            "rollout/engines_out_of_rotation_s": self._out_of_rotation_s
            + sum(now - s.out_since for s in self._slots.values() if s.out_since is not None),
            "rollout/engines_left_rotation": float(self._counts["out_of_rotation"]),
            "rollout/engines_dropped_from_update": float(self._counts["update_dropped"]),
            "rollout/engines": float(len(self._slots)),
            "rollout/inflight": float(sum(len(s.tasks) for s in self._slots.values())),
            "rollout/farm_overhead_ms": 1000.0 * self._overhead_s / served,
        }

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        for task in list(self._catch_ups):
            task.cancel()
        await asyncio.gather(*self._catch_ups, return_exceptions=True)
        await asyncio.gather(*(s.engine.close() for s in self._slots.values()), return_exceptions=True)
