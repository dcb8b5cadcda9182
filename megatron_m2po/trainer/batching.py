"""Scored groups -> padded token tensors the loss consumes, split into mini-batches, DP shards and micro-batches.

Layout: a sequence is prompt + response tokens, right-padded. Position t of every per-token tensor
is the prediction of token t+1 (`targets = tokens[:, 1:]`), so the log-prob of the model's output at
position t lines up with `behavior_logprobs[:, t]`; `response_mask[:, t]` is 1 where token t+1 is a
response token. Prompt and padding positions carry mask 0 and never reach the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from megatron_m2po.types import Group

# Fields of a MicroBatch that are per-token [b, T] tensors (sliced and padded together).
TOKEN_FIELDS = ("targets", "response_mask", "behavior_logprobs", "engine_logprobs", "advantages", "staleness")

# Where the trainer's own behaviour log-probs (rollout.behavior_logprobs=trainer) are kept in a Group.
TRAINER_LOGPROBS_KEY = "trainer_logprobs"


@dataclass
class MicroBatch:
    """One forward/backward unit on one DP rank; every tensor has the same batch dimension."""

    tokens: torch.Tensor  # [b, L] long, right-padded
    targets: torch.Tensor  # [b, L-1] long
    response_mask: torch.Tensor  # [b, L-1] float (1 = response token)
    behavior_logprobs: torch.Tensor  # [b, L-1] float, log mu
    engine_logprobs: torch.Tensor  # [b, L-1] float, the engine's sampling log-probs
    advantages: torch.Tensor  # [b, L-1] float, per token
    staleness: torch.Tensor  # [b, L-1] long, consumer version - producing version

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class SequenceRow:
    """One sample flattened for training (the unit that DP and micro-batch splitting moves around)."""

    tokens: list[int]
    prompt_len: int
    behavior_logprobs: list[float]
    engine_logprobs: list[float]
    advantage: float
    versions: list[int]


def groups_to_rows(
    groups: Sequence[Group], advantages: torch.Tensor, *, behavior_source: str = "engine"
) -> list[SequenceRow]:
    """Flatten groups into rows in group order; `advantages` is one value per sample in that order."""
    rows: list[SequenceRow] = []
    i = 0
    for g in groups:
        trainer_lps = g.metadata.get(TRAINER_LOGPROBS_KEY)
        if behavior_source == "trainer" and trainer_lps is None:
            raise ValueError(
                f"group {g.prompt_id}: rollout.behavior_logprobs=trainer but the group has no "
                f"'{TRAINER_LOGPROBS_KEY}' (it was not recomputed at production time)"
            )
        for j, s in enumerate(g.samples):
            behavior = trainer_lps[j] if behavior_source == "trainer" else s.behavior_logprobs
            rows.append(
                SequenceRow(
                    tokens=list(s.prompt_ids) + list(s.response_ids),
                    prompt_len=len(s.prompt_ids),
                    behavior_logprobs=list(behavior),
                    engine_logprobs=list(s.behavior_logprobs),
                    advantage=float(advantages[i]),
                    versions=list(s.versions),
                )
            )
            i += 1
    return rows


def rows_to_microbatch(
    rows: Sequence[SequenceRow],
    *,
    consumer_version: int,
    pad_id: int,
    seq_len: int | None = None,
    batch_size: int | None = None,
) -> MicroBatch:
    """Right-pad rows into tensors; `seq_len`/`batch_size` force a fixed shape (pipeline p2p needs it).

    Extra rows added to reach `batch_size` are all padding with mask 0: they cost compute, not loss.
    """
    longest = max((len(r.tokens) for r in rows), default=2)
    L = seq_len or longest
    if L < longest:
        raise ValueError(f"seq_len {L} is shorter than the longest sequence {longest}")
    b = batch_size or len(rows)
    tokens = torch.full((b, L), pad_id, dtype=torch.long)
    per_token = {
        "response_mask": torch.zeros(b, L - 1),
        "behavior_logprobs": torch.zeros(b, L - 1),
        "engine_logprobs": torch.zeros(b, L - 1),
        "advantages": torch.zeros(b, L - 1),
        "staleness": torch.zeros(b, L - 1, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        n, p = len(r.tokens), r.prompt_len
        tokens[i, :n] = torch.tensor(r.tokens, dtype=torch.long)
        span = slice(p - 1, n - 1)  # positions predicting the response tokens
        per_token["response_mask"][i, span] = 1.0
        per_token["behavior_logprobs"][i, span] = torch.tensor(r.behavior_logprobs, dtype=torch.float32)
        per_token["engine_logprobs"][i, span] = torch.tensor(r.engine_logprobs, dtype=torch.float32)
        per_token["advantages"][i, span] = r.advantage
        per_token["staleness"][i, span] = consumer_version - torch.tensor(r.versions, dtype=torch.long)
    return MicroBatch(tokens=tokens, targets=tokens[:, 1:].clone(), **per_token)


def split_minibatches(groups: Sequence[Group], groups_per_update: int) -> list[list[Group]]:
    """Consecutive mini-batches of whole prompt groups, one per optimizer update."""
    if len(groups) % groups_per_update:
        raise ValueError(f"{len(groups)} groups do not split into mini-batches of {groups_per_update}")
    return [list(groups[i : i + groups_per_update]) for i in range(0, len(groups), groups_per_update)]


def shard_for_rank(rows: Sequence[SequenceRow], dp_rank: int, dp_size: int) -> list[SequenceRow]:
    """This DP rank's contiguous share of a mini-batch's rows (config validation makes it divide evenly)."""
    if len(rows) % dp_size:
        raise ValueError(f"{len(rows)} sequences do not split evenly over {dp_size} data-parallel ranks")
    per = len(rows) // dp_size
    return list(rows[dp_rank * per : (dp_rank + 1) * per])


def make_microbatches(
    rows: Sequence[SequenceRow],
    micro_batch_size: int,
    *,
    consumer_version: int,
    pad_id: int,
    fixed_shape: bool,
    seq_len: int | None = None,
) -> list[MicroBatch]:
    """Cut a DP shard into micro-batches; with `fixed_shape` all have the same [micro_batch_size, seq_len]."""
    chunks = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    if fixed_shape:
        L = seq_len or max(len(r.tokens) for r in rows)
        return [
            rows_to_microbatch(
                c, consumer_version=consumer_version, pad_id=pad_id, seq_len=L, batch_size=micro_batch_size
            )
            for c in chunks
        ]
    return [rows_to_microbatch(c, consumer_version=consumer_version, pad_id=pad_id) for c in chunks]


def rollout_metrics(groups: Sequence[Group]) -> dict[str, float]:
    """`rollout/` scalars of a consumed batch (staleness depends on the consuming update: `train.staleness_of`)."""
    rewards = [r for g in groups for r in g.rewards]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    truncated = [s.finish_reason == "length" for g in groups for s in g.samples]
    flat = [len(set(g.rewards)) == 1 for g in groups]
    n = max(1, len(rewards))
    return {
        "rollout/reward_mean": sum(rewards) / n,
        "rollout/accuracy": sum(r >= 1.0 for r in rewards) / n,
        "rollout/response_length_mean": sum(lengths) / max(1, len(lengths)),
        "rollout/response_length_max": float(max(lengths, default=0)),
        "rollout/truncated_fraction": sum(truncated) / max(1, len(truncated)),
        "rollout/zero_advantage_group_fraction": sum(flat) / max(1, len(flat)),
    }
