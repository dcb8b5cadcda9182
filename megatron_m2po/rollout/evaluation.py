"""Accuracy of a model on prompt sets through any rollout engine: avg@k and pass@k.

The library half of `m2po evaluate` (`commands/evaluate.py`), used by the trainer's held-out evaluation,
the demo and the sweep. A checkpoint is an HF model dir or a Megatron checkpoint dir (converted to HF in a
scratch dir with `checkpoint.convert`). Each set is read with `PromptDataset`: a benchmark shipped with the
package (`data.benchmarks`) by its name, with its own field mapping (problem/question, answer/final_answer,
Minerva's boxed `solution`, GSM8K's `####`); other files with explicit keys. Every prompt is sampled k
times; a response is correct when the reward function (math-verify on the last `\\boxed{}` by default)
gives the full reward 1.0, so a format-only reward never counts as correct.

avg@k is the mean correctness over all k samples of all prompts (the paper's metric); pass@j uses the
unbiased estimator of Chen et al. (2021), pass@j = E_prompts[1 - C(n - c, j) / C(n, j)].
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer

from megatron_m2po.checkpoint.convert import convert_megatron_to_hf
from megatron_m2po.checkpoint.megatron_ckpt import is_megatron_checkpoint
from megatron_m2po.choices import BenchmarkName
from megatron_m2po.config import Config, SandboxConfig
from megatron_m2po.data.benchmarks import get_benchmark
from megatron_m2po.data.prompts import PromptDataset
from megatron_m2po.models.hf_config import hf_config_dir as run_hf_config_dir
from megatron_m2po.rollout.build import engine_farm
from megatron_m2po.rollout.environments import Environment, environment_class
from megatron_m2po.rollout.rewards import RewardPool
from megatron_m2po.types import Sample, SamplingParams

logger = logging.getLogger(__name__)

ENGINES = ("local", "sglang", "vllm")
BENCHMARK_NAMES = typing.get_args(BenchmarkName)
FULL_REWARD = 1.0


# ------------------------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct out of n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """avg@n and pass@k (k in `ks`, k <= n) over prompts, each with the same number n of samples."""
    if not correct:
        raise ValueError("summarize: no prompts")
    n = len(correct[0])
    if n == 0 or any(len(row) != n for row in correct):
        raise ValueError(
            f"summarize: every prompt needs the same number (>= 1) of samples, got {n} and others"
        )
    out = {f"avg@{n}": sum(sum(row) for row in correct) / (n * len(correct))}
    for k in sorted(set(ks)):
        if k > n:
            raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n} (raise -k)")
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(row), k) for row in correct) / len(correct)
    out["num_prompts"] = float(len(correct))
    return out


# ------------------------------------------------------------------------------------------ engines


def _training_run_model(ckpt: Path) -> Path | None:
    """The HF dir a training run started from (its `config.yaml`'s model.path), for RUN/checkpoints/step_N."""
    for run_dir in (ckpt.parent.parent, ckpt.parent.parent.parent):
        config = run_dir / "config.yaml"
        if config.is_file():
            model_path = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("path")
            return run_hf_config_dir(model_path) if model_path else None
    return None


def resolve_hf_dir(
    checkpoint: str | Path, scratch: str | Path, hf_config_dir: str | Path | None = None
) -> Path:
    """The HF model dir to serve: `checkpoint` itself, or a Megatron checkpoint converted into `scratch`.

    Megatron checkpoints: a converter dir (`m2po_checkpoint.json`), or a training checkpoint
    `RUN/checkpoints/step_N` (or its `dist/`), whose config and tokenizer come from `hf_config_dir`,
    else from the HF model the run started from (RUN/config.yaml).
    """
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} is not a directory (an HF model dir or a Megatron checkpoint)"
        )
    dist = path / "dist" if (path / "dist" / "metadata.json").is_file() else path
    if is_megatron_checkpoint(path) or (dist / "metadata.json").is_file():
        source = None if is_megatron_checkpoint(path) else (hf_config_dir or _training_run_model(dist))
        if not is_megatron_checkpoint(path) and source is None:
            raise FileNotFoundError(
                f"checkpoint {path}: a raw Megatron dist checkpoint needs --hf-config-dir (config.json + tokenizer)"
            )
        logger.info("converting Megatron checkpoint %s to HF in %s", path, scratch)
        return convert_megatron_to_hf(dist if source else path, Path(scratch) / "hf", hf_config_dir=source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint {path}: no config.json (HF model dir) and no Megatron checkpoint marker"
        )
    return path


def build_engine(
    kind: str,
    hf_dir: Path,
    *,
    urls: Sequence[str] = (),
    router_url: str = "",
    seed: int = 0,
    threads: int | None = None,
):
    """A farm serving the model, built as the trainer builds its own (`rollout.build.engine_farm`, with
    its API-key environment variables): local in process, vLLM in process or by URL, SGLang servers by URL
    or an sglang-router (`router_url`) in front of them."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINES}")
    if kind == "sglang" and not urls:
        raise ValueError(
            "--engine sglang needs --url: the SGLang servers (with --router-url, the servers behind the router, "
            "whose /server_info the client reads)"
        )
    if router_url and kind != "sglang":
        raise ValueError("--router-url is for --engine sglang (an sglang-router)")
    cfg = Config()
    cfg.rollout.engine, cfg.rollout.urls, cfg.rollout.router_url = kind, list(urls), router_url
    cfg.train.seed, cfg.train.torch_threads = seed, threads or 0
    return engine_farm(cfg, str(hf_dir), torch.float32)


def stop_token_ids(tokenizer) -> list[int]:
    """End of text, padding and the chat template's end of turn: the trainer's rollouts stop on the same."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


async def generate_all(
    engine,
    prompts: Sequence,
    n: int,
    params: SamplingParams,
    concurrency: int,
    on_prompt_done: Callable[[], None] | None = None,
) -> list[list[Sample]]:
    """n samples for every prompt, at most `concurrency` prompts in flight, in prompt order;
    `on_prompt_done()` as each prompt's samples arrive (a progress bar)."""
    # the engine seeds each request from params.seed (the run seed) and the prompt id
    return await _each_prompt(
        lambda p: engine.generate(p.prompt_id, p.prompt_ids, n, params), prompts, concurrency, on_prompt_done
    )


async def rollout_all(
    environment: Environment,
    prompts: Sequence,
    n: int,
    concurrency: int,
    on_prompt_done: Callable[[], None] | None = None,
) -> list[list[Sample]]:
    """`generate_all` through a multi-turn environment: n trajectories per prompt, scored by it (`Sample.reward`)."""
    return await _each_prompt(lambda p: environment.rollout(p, n), prompts, concurrency, on_prompt_done)


async def _each_prompt(
    rollout: Callable[[Any], Awaitable[list[Sample]]],
    prompts: Sequence,
    concurrency: int,
    on_prompt_done: Callable[[], None] | None,
) -> list[list[Sample]]:
    limit = asyncio.Semaphore(concurrency)

    async def one(prompt) -> list[Sample]:
        async with limit:
            samples = await rollout(prompt)
        if on_prompt_done is not None:
            on_prompt_done()
        return samples

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def environment_eval_metrics(environment: Environment) -> dict[str, float]:
    """An evaluation environment's per-trajectory means and fractions (`env/used_tool_fraction` ->
    `used_tool_fraction`: the share of answers given after a tool call ran), without its running counts."""
    return {
        key.removeprefix("env/"): value
        for key, value in environment.metrics().items()
        if key.startswith("env/") and key.endswith(("_mean", "_fraction"))
    }


# ----------------------------------------------------------------------------------------- datasets


@dataclass
class FileSpec:
    """One evaluation set: a prompt file and how its rows are read; `FileSpec.benchmark(name)` for a shipped set."""

    path: Path
    problem_key: str = "problem"
    answer_key: str = "answer"
    answer_format: str = "plain"
    name: str = ""  # in results and metrics; empty = the file's stem

    @classmethod
    def benchmark(cls, name: str) -> FileSpec:
        """A benchmark shipped with the package (`data.benchmarks`), with its field mapping."""
        b = get_benchmark(name)
        return cls(b.path, **b.fields, name=b.name)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


def open_dataset(
    spec: FileSpec, tokenizer, *, template: str, apply_chat_template: bool, max_prompts: int = 0
):
    """The set's prompts in file order (first `max_prompts` when > 0), with its field mapping."""
    dataset = PromptDataset(
        spec.path,
        tokenizer,
        problem_key=spec.problem_key,
        answer_key=spec.answer_key,
        answer_format=spec.answer_format,
        template=template,
        apply_chat_template=apply_chat_template,
        shuffle=False,
    )
    count = len(dataset) if max_prompts <= 0 else min(max_prompts, len(dataset))
    return dataset, [dataset[i] for i in range(count)]


# -------------------------------------------------------------------------------------- evaluation


@dataclass
class FileResult:
    name: str
    path: str
    metrics: dict[str, float]
    seconds: float
    responses: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    checkpoint: str | Path,
    files: Sequence[FileSpec],
    *,
    responses_per_prompt: int = 1,
    pass_ks: Sequence[int] = (1,),
    sampling: SamplingParams | None = None,
    engine: str = "local",
    urls: Sequence[str] = (),
    router_url: str = "",
    template: str = "{problem}",
    apply_chat_template: bool = True,
    max_prompts: int = 0,
    concurrency: int = 8,
    reward_fn: str = "megatron_m2po.rollout.rewards:math_reward",
    reward_workers: int = 1,
    reward_timeout: float = 5.0,
    keep_responses: bool = False,
    threads: int | None = None,
    hf_config_dir: str | Path | None = None,
    on_prompt_done: Callable[[], None] | None = None,
    env: str = "math",
    env_settings: dict[str, Any] | None = None,
    sandbox: SandboxConfig | None = None,
) -> list[FileResult]:
    """Sample every prompt of every file `responses_per_prompt` times and score them; one result per file.
    `on_prompt_done()` as each prompt's samples arrive.

    `env` (a `rollout.env` name, with its `env_settings`): a multi-turn environment answers every prompt
    through its own turns (tool_math: with the tool, run in a pool built from `sandbox`), as a training
    run's rollouts do; each file's metrics then also hold its `environment_eval_metrics`."""
    if responses_per_prompt < 1:
        raise ValueError(f"responses_per_prompt must be >= 1, got {responses_per_prompt}")
    too_big = [k for k in pass_ks if not 1 <= k <= responses_per_prompt]
    if too_big:
        raise ValueError(
            f"pass@k for k={too_big} needs 1 <= k <= responses_per_prompt={responses_per_prompt}"
        )
    ks = sorted({*pass_ks, 1})
    params = sampling or SamplingParams(max_new_tokens=1024, temperature=0.0)
    results = []
    with tempfile.TemporaryDirectory(prefix="m2po-eval-") as scratch:
        hf_dir = resolve_hf_dir(checkpoint, scratch, hf_config_dir)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        params = SamplingParams(**{**asdict(params), "stop_token_ids": stop_token_ids(tokenizer)})
        farm = build_engine(
            engine, hf_dir, urls=urls, router_url=router_url, seed=params.seed or 0, threads=threads
        )
        with RewardPool(reward_fn, workers=reward_workers, timeout=reward_timeout) as rewards:
            environment = _multi_turn_environment(
                env, env_settings, sandbox, farm, rewards, tokenizer, params
            )

            async def all_files() -> None:
                try:
                    for spec in files:
                        results.append(
                            await _evaluate_file(
                                farm,
                                rewards,
                                spec,
                                tokenizer,
                                n=responses_per_prompt,
                                ks=ks,
                                params=params,
                                template=template,
                                apply_chat_template=apply_chat_template,
                                max_prompts=max_prompts,
                                concurrency=concurrency,
                                keep_responses=keep_responses,
                                on_prompt_done=on_prompt_done,
                                environment=environment,
                            )
                        )
                finally:
                    if environment is not None:
                        await environment.close()
                    await farm.close()

            asyncio.run(all_files())
    return results


def _multi_turn_environment(
    name: str,
    settings: dict[str, Any] | None,
    sandbox: SandboxConfig | None,
    farm,
    rewards,
    tokenizer,
    params,
) -> Environment | None:
    """The `env` environment when it is multi-turn (None for single-turn: one engine call per prompt)."""
    cls = environment_class(name)
    if not cls.multi_turn:
        if settings:
            cls.parse_settings(settings)  # a key it does not have is named, even where none is used
        return None
    extra = {"sandbox": sandbox or SandboxConfig()} if cls.uses_sandbox else {}
    return cls(farm, rewards, tokenizer, params, settings=cls.parse_settings(settings), **extra)


async def _evaluate_file(
    farm,
    rewards,
    spec: FileSpec,
    tokenizer,
    *,
    n,
    ks,
    params,
    template,
    apply_chat_template,
    max_prompts,
    concurrency,
    keep_responses,
    on_prompt_done=None,
    environment: Environment | None = None,
) -> FileResult:
    start = time.perf_counter()
    _, prompts = open_dataset(
        spec, tokenizer, template=template, apply_chat_template=apply_chat_template, max_prompts=max_prompts
    )
    if environment is None:
        groups = await generate_all(farm, prompts, n, params, concurrency, on_prompt_done)
        texts = [s.response_text for g in groups for s in g]
        answers = [p.answer for p, g in zip(prompts, groups) for _ in g]
        scores = await rewards.score_async(texts, answers)
    else:
        file_env = environment.for_evaluation(params)  # this file's own counters
        groups = await rollout_all(file_env, prompts, n, concurrency, on_prompt_done)
        texts = [s.response_text for g in groups for s in g]
        scores = [s.reward for g in groups for s in g]
    correct = [[score >= FULL_REWARD for score in scores[i * n : (i + 1) * n]] for i in range(len(prompts))]
    metrics = summarize(correct, ks)
    metrics["mean_response_tokens"] = sum(len(s.response_ids) for g in groups for s in g) / max(1, len(texts))
    metrics["truncated_fraction"] = sum(s.finish_reason == "length" for g in groups for s in g) / max(
        1, len(texts)
    )
    if environment is not None:
        metrics.update(environment_eval_metrics(file_env))
    responses = []
    if keep_responses:
        for i, (p, g) in enumerate(zip(prompts, groups)):
            responses.append(
                {
                    "prompt_id": p.prompt_id,
                    "answer": p.answer,
                    "responses": [s.response_text for s in g],
                    "correct": correct[i],
                }
            )
    seconds = time.perf_counter() - start
    logger.info("%s: %s in %.1fs", spec.label, metrics, seconds)
    return FileResult(spec.label, str(spec.path), metrics, seconds, responses)
