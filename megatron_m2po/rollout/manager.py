"""RolloutManager: prompts -> environment (engine farm, rewards) -> replay queue, as an asyncio producer.

In `bounded` mode it runs in the background (`start()`): for each prompt it asks the queue to
admit one group (the queue's staleness rule decides when producing is allowed), has the environment
(`rollout.env`) turn it into n scored samples and `put`s the group (exactly-once by
prompt_id). In `sync` / `fixed` modes the trainer calls `generate_batch` in line (or `submit_batch`,
and trains while it runs). Advantages are
the trainer's job; rewards are stored in `Sample.reward`.

With dynamic sampling (`rollout/dynamic_sampling.py`) a group whose rewards do not vary never reaches the
queue: in the background its reservation is released and the producer goes on within the staleness bound; in
line the batch is refilled at the same version until it holds the groups asked for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from megatron_m2po.data.prompts import Prompt, PromptDataset
from megatron_m2po.event_loop import LoopThread
from megatron_m2po.io_errors import WriteError
from megatron_m2po.rollout.dynamic_sampling import DynamicSampling
from megatron_m2po.rollout.environments import Environment, SingleTurnMath
from megatron_m2po.rollout.farm import EngineFarm, FarmError
from megatron_m2po.rollout.stops import ProducerStopped, PromptsSaturated
from megatron_m2po.types import Group, SamplingParams

logger = logging.getLogger(__name__)


class RolloutManager:
    """`max_inflight_groups` bounds concurrent groups (default: 4 per engine); the queue's admission
    bounds staleness. Prompts already accepted by the queue (after a restart) are skipped.

    `max_write_failures`: the background producer stops after this many groups in a row failed to be
    written for a reason retrying does not cure (disk full, I/O error, read-only filesystem), and
    `check_alive` raises that error for the trainer, instead of generating and failing forever.

    `dynamic_sampling`: drop groups with flat rewards and generate others in their place (None: keep all)."""

    def __init__(
        self,
        dataset: PromptDataset,
        farm: EngineFarm,
        reward_pool,
        queue,
        *,
        responses_per_prompt: int,
        sampling: SamplingParams,
        max_inflight_groups: int | None = None,
        max_write_failures: int = 8,
        loop: LoopThread | None = None,
        environment: Environment | None = None,
        dynamic_sampling: DynamicSampling | None = None,
    ):
        if responses_per_prompt < 1:
            raise ValueError(f"RolloutManager: responses_per_prompt must be >= 1, got {responses_per_prompt}")
        self.dataset, self.farm, self.reward_pool, self.queue = dataset, farm, reward_pool, queue
        self.responses_per_prompt, self.sampling = responses_per_prompt, sampling
        self.environment = environment or SingleTurnMath(farm, reward_pool, dataset.tokenizer, sampling)
        self.max_inflight_groups = max_inflight_groups or 4 * len(farm.engines)
        self._loop = loop or LoopThread("rollout-manager")
        self._owns_loop = loop is None
        farm.loop = self._loop.loop  # WeightSync submits the farm's weight updates to this loop
        self._skip_ids = set(queue.accepted_prompt_ids()) if queue is not None else set()
        self._inflight_states: OrderedDict[str, dict] = OrderedDict()  # prompt_id -> data state before it
        self._producer = None
        self._stopping = False
        self.max_write_failures = max_write_failures
        self._write_failures = 0  # consecutive groups whose journal write failed persistently
        self.fatal_error: WriteError | PromptsSaturated | None = None
        self.dynamic_sampling = dynamic_sampling
        self._counts = {
            "groups": 0,
            "samples": 0,
            "failed_groups": 0,
            "duplicates": 0,
            "skipped_accepted": 0,
            "response_tokens": 0,
        }
        self._reward_sum = 0.0

    # -- prompts ---------------------------------------------------------------------------------------
    def _next_prompt(self) -> Prompt:
        while True:
            state = self.dataset.state_dict()
            (prompt,) = self.dataset.next_prompts(1)
            if prompt.prompt_id in self._skip_ids:
                self._skip_ids.discard(prompt.prompt_id)
                self._counts["skipped_accepted"] += 1
                continue
            self._inflight_states[prompt.prompt_id] = state
            return prompt

    def state_dict(self) -> dict[str, Any]:
        """Data position before the oldest prompt not yet accepted, so a resume loses none (the queue's
        accepted ids make it skip those that were accepted after it)."""
        if self._inflight_states:
            return dict(next(iter(self._inflight_states.values())))
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)

    # -- one group -------------------------------------------------------------------------------------
    async def _make_group(self, prompt: Prompt) -> Group:
        samples = await self.environment.rollout(prompt, self.responses_per_prompt)
        self._counts["groups"] += 1
        self._counts["samples"] += len(samples)
        self._counts["response_tokens"] += sum(len(s.response_ids) for s in samples)
        self._reward_sum += sum(0.0 if s.reward is None else s.reward for s in samples)
        return Group(
            prompt.prompt_id,
            list(prompt.prompt_ids),
            samples,
            answer=prompt.answer,
            metadata={"engine_version": self.farm.version},
        )

    # -- synchronous / fixed modes ---------------------------------------------------------------------
    def generate_batch(self, num_groups: int, version: int | None = None) -> list[Group]:
        """Generate and score `num_groups` groups now (blocking); the caller puts them in the queue."""
        return self._loop.run(self._batch(num_groups, version))

    def submit_batch(self, num_groups: int, version: int | None = None) -> Future:
        """`generate_batch` in the loop's thread; returns its future at once (fixed mode trains meanwhile)."""
        return self._loop.submit(self._batch(num_groups, version))

    async def _batch(self, num_groups: int, version: int | None) -> list[Group]:
        if version is not None and version != self.farm.version:
            logger.warning(
                "generate_batch at trainer version %d but the engines hold version %d",
                version,
                self.farm.version,
            )
        if self.dynamic_sampling is not None:
            return await self.dynamic_sampling.generate_kept(num_groups, self._new_groups, time.monotonic)
        return await self._new_groups(num_groups)

    async def _new_groups(self, num_groups: int) -> list[Group]:
        """Groups for the next `num_groups` prompts, generated together."""
        prompts = [self._next_prompt() for _ in range(num_groups)]
        try:
            return list(await asyncio.gather(*(self._make_group(p) for p in prompts)))
        finally:
            for p in prompts:
                self._inflight_states.pop(p.prompt_id, None)

    # -- bounded mode: background producer -------------------------------------------------------------
    def start(self) -> None:
        if self._producer is not None:
            raise RuntimeError("RolloutManager already started")
        self._stopping = False
        self._producer = self._loop.submit(self._produce())

    async def _produce(self) -> None:
        self.farm.start()
        slots = asyncio.Semaphore(self.max_inflight_groups)
        tasks: set[asyncio.Task] = set()
        try:
            while not self._stopping:
                await slots.acquire()
                admitted = await self.queue.admit_async(1, timeout=1.0, version=self.farm.version)
                if not admitted:
                    slots.release()
                    if self.queue.closed:
                        break
                    continue
                task = asyncio.ensure_future(self._produce_one(self._next_prompt()))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _produce_one(self, prompt: Prompt) -> None:
        accepted = False
        try:
            group = await self._make_group(prompt)
            if not self._worth_queueing(group):
                self._inflight_states.pop(prompt.prompt_id, None)  # done: never queued, never trained
                return
            accepted = await self.queue.put_async(group)
            self._write_failures = 0
            if not accepted:
                self._counts["duplicates"] += 1
                logger.warning("group %s was already accepted: not queued again", prompt.prompt_id)
            accepted = True  # the reservation was used by put either way
        except WriteError as e:
            self._counts["failed_groups"] += 1
            self._write_failed(prompt, e)
        except FarmError as e:
            self._counts["failed_groups"] += 1
            logger.error("group %s dropped: %s", prompt.prompt_id, e)
        except Exception:
            self._counts["failed_groups"] += 1
            logger.exception("group %s failed", prompt.prompt_id)
        finally:
            if not accepted:
                try:
                    self.queue.release(1)
                except (ValueError, RuntimeError):
                    pass
            else:
                self._inflight_states.pop(prompt.prompt_id, None)

    def _worth_queueing(self, group: Group) -> bool:
        """Dynamic sampling's verdict on a background group; stops the producer once the prompts saturated."""
        sampling = self.dynamic_sampling
        if sampling is None:
            return True
        kept = sampling.keeps(group)
        saturated = sampling.window_exhausted(kept)
        if saturated is not None and self.fatal_error is None:
            self.fatal_error = PromptsSaturated(saturated)
            self._stopping = True
            logger.error("rollout producer stopping: %s", saturated)
        return kept

    def _write_failed(self, prompt: Prompt, error: WriteError) -> None:
        if not error.persistent:
            logger.error("group %s not queued: %s", prompt.prompt_id, error)
            return
        self._write_failures += 1
        if self._write_failures < self.max_write_failures:
            logger.error(
                "group %s not queued (%d/%d in a row): %s",
                prompt.prompt_id,
                self._write_failures,
                self.max_write_failures,
                error,
            )
        elif self.fatal_error is None:
            self.fatal_error = error
            self._stopping = True
            logger.error(
                "rollout producer stopping: %d groups in a row could not be written: %s",
                self._write_failures,
                error,
            )

    def check_alive(self) -> None:
        """Raise `ProducerStopped` (naming the cause) if the background producer ended by itself.

        The trainer calls it while waiting for data, so a producer that can no longer deliver ends the
        run with its reason instead of a wait that never returns."""
        if isinstance(self.fatal_error, PromptsSaturated):
            raise self.fatal_error
        if self.fatal_error is not None:
            raise ProducerStopped(
                f"the rollout producer stopped after {self._write_failures} failed writes in a row: "
                f"{self.fatal_error}"
            ) from self.fatal_error
        future = self._producer
        if future is None:
            return
        if not self._loop.running:
            raise ProducerStopped("the rollout producer's event-loop thread is no longer running")
        if future.done() and not self._stopping:
            error = None if future.cancelled() else future.exception()
            if error is not None:
                message = f"the rollout producer crashed: {type(error).__name__}: {error}"
                raise ProducerStopped(message) from error
            closed = " (the replay queue was closed)" if self.queue.closed else ""
            raise ProducerStopped(f"the rollout producer ended{closed}")

    @property
    def generated_tokens(self) -> int:
        """Response tokens of every group generated so far (those dynamic sampling dropped included)."""
        return self._counts["response_tokens"]

    @property
    def started(self) -> bool:
        return self._producer is not None

    def stop(self, timeout: float = 60.0) -> None:
        """Stop producing; groups in flight are cancelled (their prompts come back after a resume)."""
        self._stopping = True
        if self._producer is not None:
            try:
                self._producer.result(timeout)
            except Exception as e:  # the producer's own failure is reported, not raised at shutdown
                logger.warning("rollout producer ended with %s", e)
            self._producer = None
        if self._owns_loop:
            try:
                self._loop.run(self.environment.close(), timeout=timeout)
                self._loop.run(self.farm.close(), timeout=timeout)
            finally:
                self._loop.stop()

    def metrics(self) -> dict[str, float]:
        groups = max(self._counts["groups"], 1)
        samples = max(self._counts["samples"], 1)
        out = {
            "rollout/groups": float(self._counts["groups"]),
            "rollout/failed_groups": float(self._counts["failed_groups"]),
            "rollout/write_failures_in_a_row": float(self._write_failures),
            "rollout/duplicate_groups": float(self._counts["duplicates"]),
            "rollout/skipped_accepted": float(self._counts["skipped_accepted"]),
            "rollout/reward_mean": self._reward_sum / samples,
            "rollout/generated_response_length_mean": self._counts["response_tokens"] / samples,
            "rollout/responses_per_group": self._counts["samples"] / groups,
        }
        if self.dynamic_sampling is not None:
            out.update(self.dynamic_sampling.metrics())
        out.update(self.farm.metrics())
        out.update(self.dataset.metrics())
        out.update(self.environment.metrics())
        return out
