"""The parts of rank 0's rollout side, built from the config: prompts, engines, rewards, the queue's settings.

Only global rank 0 holds these objects (the engines and the queue journal live there); the other
ranks receive batches by broadcast (`trainer/distribute.py`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from megatron_m2po.config import Config, check_microbatch_budget
from megatron_m2po.data.prompts import PromptDataset
from megatron_m2po.rollout.dynamic_sampling import DynamicSampling
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.engines.sglang import SGLangEngine
from megatron_m2po.rollout.engines.vllm import VLLMEngine
from megatron_m2po.rollout.environments import Environment, environment_class
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.rollout.rewards import RewardPool
from megatron_m2po.types import SamplingParams

logger = logging.getLogger(__name__)


def sampling_params(cfg: Config, *, stop_token_ids: list[int]) -> SamplingParams:
    """The rollout settings; `seed` is the run seed, from which every engine derives each request's own."""
    r = cfg.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        stop_token_ids=list(stop_token_ids),
        seed=cfg.train.seed,
    )


def queue_kwargs(cfg: Config, journal_dir: Path) -> dict[str, Any]:
    s, t = cfg.staleness, cfg.train
    return {
        "mode": s.mode,
        "max_staleness": s.max_staleness,
        "groups_per_update": t.groups_per_update,
        "capacity": s.queue_capacity,
        "journal_dir": str(journal_dir),
        "fsync": s.journal_fsync,
        "segment_bytes": s.journal_segment_bytes,
        "fixed_lag_updates": cfg.fixed_lag_updates,
    }


def dynamic_sampling(cfg: Config) -> DynamicSampling | None:
    """`rollout.dynamic_sampling`'s rule and cap (None when it is off)."""
    r = cfg.rollout
    if not r.dynamic_sampling:
        return None
    return DynamicSampling(
        min_std=r.dynamic_sampling_min_std,
        max_oversampling=r.dynamic_sampling_max_oversampling,
        groups_per_update=cfg.train.groups_per_update,
    )


def build_engines(
    cfg: Config, hf_dir: str, dtype: torch.dtype, *, routed_experts: tuple[int, int] | None = None
) -> list:
    """The `rollout.engine` engines; `routed_experts` = (MoE layers, top_k): every sample carries the experts
    the engine routed its tokens to (routing replay), as the local engine records and SGLang returns them."""
    r = cfg.rollout
    if r.engine == "local":
        threads = cfg.train.torch_threads or None
        if r.local_dtype != "auto":
            dtype = getattr(torch, r.local_dtype)
        return [
            LocalEngine(
                hf_dir,
                engine_id=f"local-{i}",
                dtype=dtype,
                threads=threads,
                seed=cfg.train.seed + i,
                record_routing=routed_experts is not None,
            )
            for i in range(r.num_engines)
        ]
    if routed_experts is not None and r.engine != "sglang":  # config.routing_replay_on refuses it first
        raise ValueError(f"rollout.engine={r.engine} does not return routed experts")
    if r.engine == "sglang":
        kwargs = {
            "routed_experts": routed_experts,
            "deterministic": r.sglang_deterministic,
            "api_key": os.environ.get(r.api_key_env) or None,
            "admin_api_key": os.environ.get(r.admin_api_key_env) or None,
        }
        if r.router_url:  # one endpoint: generation through the router, control calls to every server in urls
            return [SGLangEngine(r.router_url, worker_urls=r.urls, engine_id="sglang-router", **kwargs)]
        return [SGLangEngine(url, engine_id=f"sglang-{i}", **kwargs) for i, url in enumerate(r.urls)]
    if r.urls:  # vLLM servers (their --api-key guards generation; docs/rollout.md, "vLLM")
        api_key = os.environ.get(r.api_key_env) or None
        return [
            VLLMEngine(hf_dir, engine_id=f"vllm-{i}", url=url, api_key=api_key)
            for i, url in enumerate(r.urls)
        ]
    return [VLLMEngine(hf_dir, engine_id=f"vllm-{i}") for i in range(r.num_engines)]  # in process


def engine_farm(
    cfg: Config, hf_dir: str, dtype: torch.dtype, *, routed_experts: tuple[int, int] | None = None
) -> EngineFarm:
    """The engines behind one farm, with the rollout section's timeouts and rotation settings
    (`routed_experts`: see `build_engines`)."""
    r = cfg.rollout
    return EngineFarm(
        build_engines(cfg, hf_dir, dtype, routed_experts=routed_experts),
        request_timeout=r.request_timeout,
        max_engine_failures=r.engine_max_failures,
        health_interval=r.health_interval,
        update_timeout=r.weight_sync_timeout,
    )


def environment(cfg: Config, farm, rewards, tokenizer, sampling: SamplingParams) -> Environment:
    """The `rollout.env` environment with its `rollout.env_settings` (checked here: a bad key is named)."""
    cls = environment_class(cfg.rollout.env)
    settings = cls.parse_settings(cfg.rollout.env_settings)
    check_microbatch_budget(cfg, cls.prompt_extra_tokens(tokenizer, settings))  # what validate cannot count
    extra = {"sandbox": cfg.sandbox} if cls.uses_sandbox else {}
    return cls(farm, rewards, tokenizer, sampling, settings=settings, **extra)


def reward_pool(cfg: Config):
    r = cfg.rollout
    fn_kwargs = {"format_reward": r.format_reward} if r.format_reward else None
    return RewardPool(fn=r.reward_fn, workers=r.reward_workers, timeout=r.reward_timeout, fn_kwargs=fn_kwargs)


def prompt_dataset(
    cfg: Config,
    tokenizer,
    path: str | None = None,
    *,
    problem_key=None,
    answer_key=None,
    shuffle: bool = True,
):
    d = cfg.data
    return PromptDataset(
        path or d.path,
        tokenizer,
        problem_key=problem_key or d.problem_key,
        answer_key=answer_key or d.answer_key,
        answer_format=d.answer_format,
        template=d.template,
        apply_chat_template=d.apply_chat_template,
        max_prompt_tokens=d.max_prompt_tokens,
        max_prompt_chars=d.max_prompt_chars,
        on_error=d.on_error,
        seed=cfg.train.seed,
        shuffle=shuffle,
        split=d.split,
        subset=d.subset,
    )
