"""The engine interface every rollout backend implements (docs/rollout.md, "Engines"): every one returns `types.Sample`.

An engine turns (prompt token ids, n, sampling params) into n `Sample`s with behaviour
log-probs and the policy version of every token, and takes new weights as HF-named
tensors. Weight updates are split into begin / buckets / finish so a sync can stream
bounded buckets to many engines from one pass over the trainer's weights; `update_weights`
is the one-call form.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

import torch

from megatron_m2po.types import Sample, SamplingParams

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class EngineError(RuntimeError):
    """An engine failed to serve a request (crashed, unreachable, bad reply): the farm retries elsewhere."""


class EngineRequestError(ValueError):
    """The engine rejected the request itself (HTTP 400: e.g. prompt longer than its context): retrying elsewhere
    cannot help, so the farm does not."""


class EngineReplyError(EngineError):
    """An engine answered with a reply that breaks its documented schema; the message names the field."""


class Engine(abc.ABC):
    """Async rollout engine. Implementations must be safe to call concurrently from one event loop."""

    def __init__(self, engine_id: str):
        self.engine_id = engine_id
        self._version = 0

    @property
    def version(self) -> int:
        """The policy version the engine's weights correspond to (set by the last finished weight update)."""
        return self._version

    @abc.abstractmethod
    async def generate(
        self, prompt_id: str, prompt_ids: list[int], n: int, params: SamplingParams
    ) -> list[Sample]:
        """n independent samples for one prompt; raises EngineError when the engine cannot serve it."""

    @abc.abstractmethod
    async def begin_weight_update(self, version: int) -> None:
        """Stop taking decoding steps (in-flight requests wait, unless the engine aborts them) before new weights."""

    @abc.abstractmethod
    async def update_weights_bucket(self, named_tensors: NamedTensors) -> None:
        """Load one bucket of full (TP/PP-gathered) HF-named tensors; errors name the tensor."""

    @abc.abstractmethod
    async def finish_weight_update(self, version: int) -> None:
        """New weights are complete: serve `version` from now on (tokens after this record it)."""

    async def discard_weight_update(self, reason: str) -> None:
        """The sender gave the update up before its last bucket (the trainer's gather failed): end it without
        a new version. Engines that stage buckets drop them; this default, for engines that load in place,
        ends the update keeping the version."""
        await self.finish_weight_update(self.version)

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """All tensors of one update in one call."""
        await self.begin_weight_update(version)
        try:
            await self.update_weights_bucket(named_tensors)
        finally:
            await self.finish_weight_update(version)

    @abc.abstractmethod
    async def pause(self) -> None:
        """Hold generation (in-flight requests keep their state) until `resume()`."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def health(self) -> bool:
        """True when the engine can serve requests; never raises."""

    async def close(self) -> None:
        """Release the engine's resources (sessions, threads, processes)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.engine_id!r}, version={self.version})"
