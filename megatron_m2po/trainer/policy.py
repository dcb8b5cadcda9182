"""The policy side, on every rank: the Megatron model, its optimizer and loss, and one update per mini-batch.

The update itself (micro-batches through Megatron's schedule, the loss, the optimizer step) is `step.py`;
this class turns groups of samples into that update's micro-batches (docs/training.md, "The loop").
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state

from megatron_m2po import algorithms, platform
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.config import Config, routing_replay_on
from megatron_m2po.models import load_hf_config
from megatron_m2po.trainer.batching import (
    TRAINER_LOGPROBS_KEY,
    groups_to_rows,
    make_microbatches,
    packed_segment_length,
    plan_microbatches,
)
from megatron_m2po.trainer.distribute import broadcast_from_rank0, gather_to_rank0
from megatron_m2po.trainer.optimizer import build_optimizer, wrap_ddp
from megatron_m2po.trainer.routing_diagnostics import routing_diagnostics_collective
from megatron_m2po.trainer.step import forward_logprobs_collective, train_update_collective
from megatron_m2po.types import Group


def _dtype(cfg: Config) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return platform.default_dtype()
    return getattr(torch, cfg.model.dtype)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Policy:
    """The model side: policy, optimizer, loss, and the per-batch update (every rank)."""

    def __init__(self, cfg: Config, model=None):
        """`model`: an already built GPTModel for `cfg.model.path`'s config (bench/mfu.py: random weights,
        no checkpoint to read); default: load the policy from `cfg.model.path`."""
        self.cfg = cfg
        self.dtype = _dtype(cfg)
        self.hf_config = load_hf_config(cfg.model.path)
        # MoE with algorithm.routing_replay: the engines' expert choices are replayed in every forward that
        # gives log-probs (the loss's, the M2 pre-pass, the behaviour recompute)
        self.routing_replay = routing_replay_on(cfg, self.hf_config)
        if model is None:
            model = load_policy(
                cfg.model.path,
                dtype=self.dtype,
                parallel=cfg.parallel,
                aux_loss_coef=cfg.model.router_aux_loss_coef,
                routing_replay=self.routing_replay,
            )
        self.model = wrap_ddp(model, cfg.parallel)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.dtype)
        self.loss_fn = algorithms.PolicyLoss.from_config(cfg.algorithm, cfg.rollout.behavior_logprobs)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.pad_id = int(
            getattr(self.hf_config, "pad_token_id", None) or getattr(self.hf_config, "eos_token_id", 0) or 0
        )
        mp = (
            parallel_state.get_tensor_model_parallel_world_size()
            * parallel_state.get_pipeline_model_parallel_world_size()
        )
        self.num_params = sum(p.numel() for p in self.model.parameters()) * mp  # for the MFU estimate

    @property
    def routed_experts_shape(self) -> tuple[int, int] | None:
        """(layers, top_k) of the routing the engines must return with every sample; None without replay."""
        if not self.routing_replay:
            return None
        return self.hf_config.num_hidden_layers, self.hf_config.num_experts_per_tok

    def _rows(self, groups: list[Group], advantages: torch.Tensor, behavior_source: str):
        """`groups_to_rows`, without the samples' routing when replay is off (a journal written by a run with
        replay may carry it; this model's routers cannot replay it)."""
        rows = groups_to_rows(groups, advantages, behavior_source=behavior_source)
        if not self.routing_replay:
            for row in rows:
                row.routed_experts = None
            return rows
        samples = [s for g in groups for s in g.samples]
        unrouted = [f"{s.prompt_id}#{s.group_index}" for s in samples if s.routed_experts is None]
        if unrouted:
            raise ValueError(
                f"algorithm.routing_replay is on but samples {unrouted[:4]} carry no routed experts (an engine "
                "that does not return them, or a queue journal written by a run with routing replay off)"
            )
        return rows

    def _microbatches(self, rows, version: int):
        """This DP rank's micro-batches of `rows` (`batching.plan_microbatches`), in one shape wherever the
        pipeline's p2p buffers need it: padded to the longest of `rows`, or packed to the token budget;
        lengths are multiples of the TP size under sequence parallelism (it splits the sequence) and of
        2 x CP under context parallelism (every sequence is cut into 2 x CP chunks; packed, each sequence)."""
        settings, parallel = self.cfg.train, self.cfg.parallel
        segment_multiple = 2 * parallel.context if parallel.context > 1 else 1
        multiple = segment_multiple * (parallel.tensor if parallel.sequence_parallel else 1)
        pack = settings.pack_sequences or bool(settings.max_tokens_per_microbatch)
        lengths = [packed_segment_length(len(row.tokens), segment_multiple if pack else 1) for row in rows]
        plan = plan_microbatches(
            lengths,
            self.dp_size,
            micro_batch_size=settings.micro_batch_size,
            max_tokens=settings.max_tokens_per_microbatch,
        )
        if pack:
            seq_len = None
            longest = max(sum(lengths[i] for i in mb) for shard in plan for mb in shard)
            fixed = parallel_state.get_pipeline_model_parallel_world_size() > 1
            packed_len = (
                _round_up(max(settings.max_tokens_per_microbatch, longest), multiple) if fixed else None
            )
        else:
            seq_len, packed_len = _round_up(max(lengths), multiple), None
        return make_microbatches(
            rows,
            plan[self.dp_rank],
            consumer_version=version,
            pad_id=self.pad_id,
            pack=pack,
            seq_len=seq_len,
            batch_size=settings.micro_batch_size,
            packed_len=packed_len,
            multiple=multiple,
            segment_multiple=segment_multiple,
        )

    def update_collective(
        self, groups: list[Group], version: int, *, force_pre_pass: bool = False
    ) -> dict[str, float]:
        """One optimizer update on one mini-batch of groups consumed at policy `version` (`force_pre_pass`:
        see `step.train_update_collective`)."""
        cfg = self.cfg
        a = cfg.algorithm
        rewards = torch.tensor([reward for g in groups for reward in g.rewards], dtype=torch.float32)
        lengths = torch.tensor([s.model_tokens for g in groups for s in g.samples])
        truncated = [s.finish_reason == "length" for g in groups for s in g.samples]
        extra: dict[str, float] = {}
        if a.overlong_buffer:
            penalty = algorithms.soft_overlong_penalty(lengths, cfg.rollout.max_new_tokens, a.overlong_buffer)
            rewards = rewards + penalty.float()
            extra["train/overlong_penalty_mean"] = float(penalty.mean())
        ids = [g.prompt_id for g in groups for _ in g.samples]
        advantages = algorithms.compute_advantages(rewards, ids, estimator=a.advantage)
        rows = self._rows(groups, advantages, cfg.rollout.behavior_logprobs)
        if a.overlong_filtering:
            for row, cut in zip(rows, truncated):
                row.in_loss = not cut
            extra["train/overlong_filtered_fraction"] = sum(truncated) / max(1, len(truncated))
        mbs = self._microbatches(rows, version)
        every = a.routing_diagnostics_every
        if self.routing_replay and every and version % every == 0:
            extra |= routing_diagnostics_collective(self.model, mbs, cfg.rollout.temperature)
        # The loss is a mean over the whole mini-batch (all DP ranks): DDP averages over DP, hence / dp.
        total = self.loss_fn.normalizer_count([row.loss_tokens for row in rows])
        normalizer = max(total, 1) / self.dp_size
        return extra | train_update_collective(
            self.model,
            self.optimizer,
            self.scheduler,
            mbs,
            self.loss_fn,
            temperature=cfg.rollout.temperature,
            normalizer=normalizer,
            force_pre_pass=force_pre_pass,
        )

    def recompute_behavior_logprobs_collective(self, groups: list[Group] | None) -> None:
        """rollout.behavior_logprobs=trainer: log-probs of the current (= producing) weights, stored in the groups.

        Collective. Each DP rank computes an interleaved share; rank 0 collects them into its groups.
        """
        groups = broadcast_from_rank0(groups)
        zeros = torch.zeros(len([s for g in groups for s in g.samples]))
        rows = self._rows(groups, zeros, "engine")
        out: dict[int, list[float]] = {}
        mbs = self._microbatches(rows, version=0)  # none on a rank whose share is empty
        if mbs:
            lps = forward_logprobs_collective(self.model, mbs, self.cfg.rollout.temperature)
            for mb, lp in zip(mbs, lps):
                for i, lp_row in zip(mb.row_index.tolist(), lp):
                    if i >= 0:
                        row = rows[i]
                        out[i] = lp_row[row.prompt_len - 1 : len(row.tokens) - 1].tolist()
        parts = gather_to_rank0(out if parallel_state.is_pipeline_last_stage() else {})
        if parts is None:
            return
        merged = {k: v for p in parts for k, v in p.items()}
        i = 0
        for g in groups:  # on rank 0 these are the producer's own Group objects
            g.metadata[TRAINER_LOGPROBS_KEY] = [merged[i + j] for j in range(len(g.samples))]
            i += len(g.samples)

    def state_dict_extra(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}
