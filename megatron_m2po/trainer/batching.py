"""Scored groups -> token tensors the loss consumes, split into mini-batches, DP shards and micro-batches.

Layout the loss sees: a sequence is prompt + response tokens, right-padded. Position t of every per-token
tensor is the prediction of token t+1 (`targets = tokens[:, 1:]`), so the log-prob of the model's output at
position t lines up with `behavior_logprobs[:, t]`; `response_mask[:, t]` is 1 where token t+1 is a
response token the model sampled. Prompt and padding positions, and the environment's tokens inside a
multi-turn response (`Sample.loss_mask` 0), carry mask 0 and never reach the loss or a diagnostic.

Packing (`train.pack_sequences`): the model instead runs on the micro-batch's sequences concatenated into
one row [1, T] (`PackedLayout`, Megatron's THD format with `cu_seqlens`), so no compute goes to padding;
the per-token log-probs are gathered back into the padded layout above (`PackedLayout.index`), so the
loss, the M2 pre-pass and every diagnostic see exactly the tensors of the padded path.

Micro-batches hold either `micro_batch_size` sequences (contiguous DP shards, as before), or, with
`train.max_tokens_per_microbatch`, as many tokens as fit the budget: sequences are spread over the DP
ranks and then over the fewest micro-batches (the same count on every rank) balanced by tokens.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from megatron_m2po.types import Group

# Fields of a MicroBatch that are per-token [b, T] tensors (sliced and padded together).
TOKEN_FIELDS = ("targets", "response_mask", "behavior_logprobs", "engine_logprobs", "advantages", "staleness")

# Where the trainer's own behaviour log-probs (rollout.behavior_logprobs=trainer) are kept in a Group.
TRAINER_LOGPROBS_KEY = "trainer_logprobs"


def _to(obj, device: torch.device):
    return type(obj)(**{f.name: _move(getattr(obj, f.name), device) for f in fields(obj)})


def _move(value, device: torch.device):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return _to(value, device)


@dataclass
class PackedLayout:
    """A micro-batch's sequences concatenated for the model (THD): one row, positions restart per sequence."""

    tokens: torch.Tensor  # [1, T] long; a trailing pad segment fills up to T
    position_ids: torch.Tensor  # [1, T] long, 0.. within each segment
    cu_seqlens: torch.Tensor  # [segments + 1] int32 segment bounds, 0 .. T
    index: (
        torch.Tensor
    )  # [b, L-1] long: the packed position (of targets = tokens[:, 1:]) of each padded slot, -1 = none
    routed_experts: torch.Tensor | None = None  # [1, T, layers, top_k] long, as MicroBatch.routed_experts

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """A packed per-token tensor [1, T-1] -> the padded layout [b, L-1] (0 where no token)."""
        valid = self.index >= 0
        return torch.where(valid, per_token[0][self.index.clamp(min=0)], 0.0)


@dataclass
class MicroBatch:
    """One forward/backward unit on one DP rank; every tensor has the same batch dimension."""

    tokens: torch.Tensor  # [b, L] long, right-padded
    targets: torch.Tensor  # [b, L-1] long
    response_mask: torch.Tensor  # [b, L-1] float (1 = response token the model sampled)
    behavior_logprobs: torch.Tensor  # [b, L-1] float, log mu
    engine_logprobs: torch.Tensor  # [b, L-1] float, the engine's sampling log-probs
    advantages: torch.Tensor  # [b, L-1] float, per token
    staleness: torch.Tensor  # [b, L-1] long, consumer version - producing version
    row_index: torch.Tensor  # [b] long: each row's index in the rows it was cut from (-1 = filler)
    packed: PackedLayout | None = None  # set when the model runs on the packed form
    # [b, L, layers, top_k] long: the engine's experts for every token, replayed in the forward (MoE with
    # routing replay); positions the engine did not feed (last token, padding) take experts 0..k-1
    routed_experts: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def to(self, device: torch.device) -> MicroBatch:
        return _to(self, device)


@dataclass
class SequenceRow:
    """One sample flattened for training (the unit that DP and micro-batch splitting moves around)."""

    tokens: list[int]
    prompt_len: int
    behavior_logprobs: list[float]
    engine_logprobs: list[float]
    advantage: float
    versions: list[int]
    in_loss: bool = True  # False: trained on by nobody (overlong filtering), its tokens outside the mask
    routed_experts: np.ndarray | None = None  # Sample.routed_experts: [len(tokens) - 1, layers, top_k]
    loss_mask: list[int] | None = None  # Sample.loss_mask: 1 = the model's token; None: every response token

    @property
    def loss_tokens(self) -> int:
        """The response tokens the loss counts (what token-mean losses divide by)."""
        if not self.in_loss:
            return 0
        return len(self.tokens) - self.prompt_len if self.loss_mask is None else sum(self.loss_mask)


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
                    routed_experts=s.routed_experts,
                    loss_mask=None if s.loss_mask is None else list(s.loss_mask),
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
    row_index: Sequence[int] | None = None,
    pack: bool = False,
    packed_len: int | None = None,
    segment_multiple: int = 1,
) -> MicroBatch:
    """Right-pad rows into tensors; `seq_len`/`batch_size` force a fixed shape (pipeline p2p needs it).

    Extra rows added to reach `batch_size` are all padding with mask 0: they cost compute, not loss.
    `pack` adds the packed form (`PackedLayout`), padded to `packed_len` tokens when given, each sequence's
    segment to a multiple of `segment_multiple` tokens.
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
        if r.loss_mask is None or not r.in_loss:
            per_token["response_mask"][i, span] = 1.0 if r.in_loss else 0.0
        else:
            per_token["response_mask"][i, span] = torch.tensor(r.loss_mask, dtype=torch.float32)
        per_token["behavior_logprobs"][i, span] = torch.tensor(r.behavior_logprobs, dtype=torch.float32)
        per_token["engine_logprobs"][i, span] = torch.tensor(r.engine_logprobs, dtype=torch.float32)
        per_token["advantages"][i, span] = r.advantage
        per_token["staleness"][i, span] = consumer_version - torch.tensor(r.versions, dtype=torch.long)
    index = torch.full((b,), -1, dtype=torch.long)
    index[: len(rows)] = torch.tensor(list(row_index) if row_index is not None else range(len(rows)))
    return MicroBatch(
        tokens=tokens,
        targets=tokens[:, 1:].clone(),
        row_index=index,
        packed=pack_rows(rows, L, pad_id=pad_id, packed_len=packed_len, segment_multiple=segment_multiple)
        if pack
        else None,
        routed_experts=_routed_rows(rows, b, L),
        **per_token,
    )


def _routed_rows(rows: Sequence[SequenceRow], b: int, L: int) -> torch.Tensor | None:
    """The rows' routed experts as one [b, L, layers, top_k] tensor (None when no row carries any).

    Positions no engine routed (each row's last token, padding, filler rows) take experts 0..k-1: their
    outputs reach no log-prob of the loss, and any valid choice keeps the replayed forward well defined.
    """
    shapes = {r.routed_experts.shape[1:] for r in rows if r.routed_experts is not None}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"rows carry routed experts of different [layers, top_k]: {sorted(shapes)}")
    layers, top_k = shapes.pop()
    out = torch.arange(top_k).expand(b, L, layers, top_k).clone()
    for i, r in enumerate(rows):
        if r.routed_experts is not None:
            fed = torch.from_numpy(r.routed_experts.astype(np.int64))
            out[i, : fed.shape[0]] = fed
    return out


def packed_segment_length(tokens: int, segment_multiple: int) -> int:
    """A sequence's segment in a packed row: its tokens, padded to a multiple of `segment_multiple`."""
    return -(-tokens // segment_multiple) * segment_multiple


def pack_rows(
    rows: Sequence[SequenceRow], L: int, *, pad_id: int, packed_len: int | None, segment_multiple: int = 1
) -> PackedLayout:
    """Concatenate rows into one [1, T] row with segment bounds; `index` maps padded slots [b, L-1] to it.

    Each row's segment is padded at its end to a multiple of `segment_multiple` (context parallelism cuts
    every segment into 2 x CP equal chunks); causality hides that padding from the row's tokens."""
    lengths = [len(r.tokens) for r in rows]
    segments = [packed_segment_length(n, segment_multiple) for n in lengths]
    total = sum(segments)
    T = packed_len or total
    if T < total:
        raise ValueError(f"packed_len {T} is shorter than the micro-batch's {total} tokens")
    if (T - total) % segment_multiple:
        raise ValueError(
            f"packed_len {T} leaves a filler segment that is not a multiple of {segment_multiple}"
        )
    tokens = torch.full((1, T), pad_id, dtype=torch.long)
    positions = torch.zeros(1, T, dtype=torch.long)
    index = torch.full((len(rows), L - 1), -1, dtype=torch.long)
    routed = _routed_rows(rows, len(rows), L)
    packed_routed = None
    if routed is not None:  # the same rows concatenated, as the tokens are
        layers, top_k = routed.shape[2:]
        packed_routed = torch.arange(top_k).expand(1, T, layers, top_k).clone()
    bounds, offset = [0], 0
    for i, (r, n, m) in enumerate(zip(rows, lengths, segments)):
        tokens[0, offset : offset + n] = torch.tensor(r.tokens, dtype=torch.long)
        positions[0, offset : offset + m] = torch.arange(m)
        index[i, : n - 1] = torch.arange(offset, offset + n - 1)
        if packed_routed is not None:
            packed_routed[0, offset : offset + n] = routed[i, :n]
        offset += m
        bounds.append(offset)
    if T > offset:  # the filler is its own segment, so no real token attends to it (nor it to them)
        positions[0, offset:] = torch.arange(T - offset)
        bounds.append(T)
    return PackedLayout(tokens, positions, torch.tensor(bounds, dtype=torch.int32), index, packed_routed)


def balanced_partition(weights: Sequence[int], k: int) -> list[list[int]]:
    """Indices of `weights` in k bins of near-equal sums (LPT: heaviest first into the lightest bin).

    Within 4/3 of the optimal largest bin; a heap of k loads is all it takes, so no solver dependency.
    Bins are returned in index order, each bin's indices ascending.
    """
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + weights[i], b))
    return [sorted(b) for b in bins]


def plan_microbatches(
    lengths: Sequence[int], dp_size: int, *, micro_batch_size: int, max_tokens: int = 0
) -> list[list[list[int]]]:
    """Row indices per DP rank per micro-batch; the same plan on every rank (it depends only on lengths).

    `max_tokens` = 0: contiguous DP shards cut into `micro_batch_size` rows (the last may be shorter). Otherwise the rows are
    balanced over the ranks by tokens, then each rank's over the fewest micro-batches (the same count on
    every rank) whose tokens fit `max_tokens`; a rank with fewer rows than micro-batches gets empty ones.
    """
    n = len(lengths)
    if not max_tokens:  # contiguous shards, sizes differing by at most one (validation makes updates even)
        bounds = [r * n // dp_size for r in range(dp_size + 1)]
        return [
            [list(range(s, min(s + micro_batch_size, hi))) for s in range(lo, hi, micro_batch_size)]
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
    too_long = [i for i, m in enumerate(lengths) if m > max_tokens]
    if too_long:
        raise ValueError(
            f"train.max_tokens_per_microbatch={max_tokens} is shorter than {len(too_long)} sequence(s) of the "
            f"mini-batch (longest {max(lengths)} tokens); raise it to at least the longest prompt + response"
        )
    ranks = balanced_partition(lengths, dp_size)
    count = max(1, *(math.ceil(sum(lengths[i] for i in r) / max_tokens) for r in ranks))
    while True:
        plan = [
            [[r[j] for j in b] for b in balanced_partition([lengths[i] for i in r], count)] for r in ranks
        ]
        if all(sum(lengths[i] for i in b) <= max_tokens for p in plan for b in p):
            return plan
        count += 1  # terminates: with one row per micro-batch every bin fits


def make_microbatches(
    rows: Sequence[SequenceRow],
    plan: Sequence[Sequence[int]],
    *,
    consumer_version: int,
    pad_id: int,
    pack: bool,
    seq_len: int | None = None,
    batch_size: int | None = None,
    packed_len: int | None = None,
    multiple: int = 1,
    segment_multiple: int = 1,
) -> list[MicroBatch]:
    """This rank's micro-batches: `plan` lists the row indices of each; an empty one holds a filler row.

    Padded: `seq_len`/`batch_size` fix the shape for every micro-batch. Packed: `packed_len` does, else
    each is its own length rounded up to `multiple` (sequence parallel splits it over the TP ranks, context
    parallelism over the CP ranks), every sequence's segment to a multiple of `segment_multiple` (2 x CP).
    """
    filler = SequenceRow(
        tokens=[pad_id, pad_id],
        prompt_len=2,
        behavior_logprobs=[],
        engine_logprobs=[],
        advantage=0.0,
        versions=[],
    )
    out = []
    for ids in plan:
        chunk = [rows[i] for i in ids] or [filler]
        out.append(
            rows_to_microbatch(
                chunk,
                consumer_version=consumer_version,
                pad_id=pad_id,
                seq_len=seq_len,
                batch_size=None if pack else batch_size,
                row_index=list(ids) or [-1],
                pack=pack,
                packed_len=packed_len
                or multiple
                * math.ceil(
                    sum(packed_segment_length(len(r.tokens), segment_multiple) for r in chunk) / multiple
                ),
                segment_multiple=segment_multiple,
            )
        )
    return out


def rollout_metrics(groups: Sequence[Group]) -> dict[str, float]:
    """`rollout/` scalars of a consumed batch (staleness depends on the consuming update: `step_metrics.staleness_of`)."""
    rewards = [r for g in groups for r in g.rewards]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    multi_turn = [s for g in groups for s in g.samples if s.loss_mask is not None]
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
    } | (_turn_metrics(multi_turn) if multi_turn else {})


def _turn_metrics(samples: Sequence) -> dict[str, float]:
    """Multi-turn responses: the model's share of their tokens and how many turns they took."""
    n = len(samples)
    return {
        "rollout/model_tokens_mean": sum(s.model_tokens for s in samples) / n,
        "rollout/turns_mean": sum(max(1, len(s.turn_starts)) for s in samples) / n,
    }
