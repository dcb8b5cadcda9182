"""The records that flow engine -> reward -> queue -> trainer (docs/rollout.md, "Engines").

One definition, used by every engine, the queue and its journal, and the trainer, so a
field means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SamplingParams:
    """Sampling settings sent to every engine; `temperature` is also what the trainer divides logits by."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] = field(default_factory=list)
    # The run seed, not a request's: each engine seeds request (prompt_id, sample i) with
    # rollout.seeding.request_seed(seed, its policy version, prompt_id, i). None: unseeded.
    seed: int | None = None


@dataclass
class Sample:
    """One response to one prompt, as an engine returns it.

    `versions[t]` is the policy version that produced response token t: a response that
    spans a weight update records both versions, so staleness is per token.

    `routed_experts` (MoE engines asked for it): the experts the engine's routers chose for every token it
    fed its model, prompt and response but the last response token, as an integer array
    [len(prompt_ids) + len(response_ids) - 1, layers, top_k]; the trainer replays them. Left out of `==`
    (an array has no single truth value): compare it with `same_routing`.
    """

    prompt_id: str
    group_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    behavior_logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    engine_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    response_text: str = ""
    reward: float | None = None
    routed_experts: np.ndarray | None = field(default=None, compare=False)
    loss_mask: list[int] | None = None
    turn_starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        where = f"sample {self.prompt_id}#{self.group_index}"
        if len(self.behavior_logprobs) != n or len(self.versions) != n:
            raise ValueError(
                f"{where}: {n} response tokens but "
                f"{len(self.behavior_logprobs)} behavior_logprobs and {len(self.versions)} versions"
            )
        if self.loss_mask is not None and (len(self.loss_mask) != n or not set(self.loss_mask) <= {0, 1}):
            raise ValueError(
                f"{where}: loss_mask must hold one 0 or 1 per response token ({n}), got "
                f"{len(self.loss_mask)} values {sorted(set(self.loss_mask))[:4]}"
            )
        starts = self.turn_starts
        if starts and (
            starts[0] != 0 or starts[-1] >= max(n, 1) or any(a >= b for a, b in zip(starts, starts[1:]))
        ):
            raise ValueError(
                f"{where}: turn_starts must rise strictly from 0 and stay below the {n} response tokens, "
                f"got {starts[:8]}"
            )
        routed = self.routed_experts
        if routed is not None:
            fed = len(self.prompt_ids) + n - 1
            if routed.ndim != 3 or routed.shape[0] != fed or routed.dtype.kind not in "iu":
                raise ValueError(
                    f"sample {self.prompt_id}#{self.group_index}: routed_experts must be integers "
                    f"[{fed} fed tokens, layers, top_k], got {routed.dtype} {tuple(routed.shape)}"
                )

    @property
    def min_version(self) -> int:
        return min(self.versions) if self.versions else -1

    @property
    def model_tokens(self) -> int:
        """Response tokens the model sampled (the tokens the loss trains on)."""
        return len(self.response_ids) if self.loss_mask is None else sum(self.loss_mask)


def same_routing(a: Sample, b: Sample) -> bool:
    """Whether two samples carry the same routed experts (both none, or equal arrays)."""
    if a.routed_experts is None or b.routed_experts is None:
        return a.routed_experts is None and b.routed_experts is None
    return a.routed_experts.shape == b.routed_experts.shape and bool(
        (a.routed_experts == b.routed_experts).all()
    )


@dataclass
class Group:
    """All n responses to one prompt, scored: the unit the replay queue stores and the trainer consumes."""

    prompt_id: str
    prompt_ids: list[int]
    samples: list[Sample]
    answer: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rewards(self) -> list[float]:
        return [0.0 if s.reward is None else float(s.reward) for s in self.samples]

    @property
    def min_version(self) -> int:
        """The oldest policy version any token of the group came from (what staleness is measured against)."""
        return min(s.min_version for s in self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.prompt_ids) + len(s.response_ids) for s in self.samples)
