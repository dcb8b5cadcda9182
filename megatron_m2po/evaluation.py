"""Accuracy of a checkpoint on benchmark files: avg@k and pass@k, through any rollout engine.

`m2po evaluate CHECKPOINT --benchmark math500 aime24 ... [--data FILE ...]` (or `python tools/evaluate.py
...`). The library functions (`evaluate`, `summarize`, `pass_at_k`) live in the package so the demo and the
sweep use them. CHECKPOINT is an HF model dir or a Megatron checkpoint dir (converted to HF in a scratch
dir with `checkpoint.convert`). Each set is read with `PromptDataset`: a benchmark shipped with the package
(`data.benchmarks`) by its name, with its own field mapping (problem/question, answer/final_answer,
Minerva's boxed `solution`, GSM8K's `####`); other files with `--problem-key/--answer-key/--answer-format`.
Every prompt is sampled `-k` times;
a response is correct when the reward function (math-verify on the last `\\boxed{}` by default)
gives the full reward 1.0, so a format-only reward never counts as correct.

Reported per file: avg@k (mean correctness over all k samples of all prompts, the paper's metric)
and pass@j for each requested j <= k with the unbiased estimator of Chen et al. (2021),
pass@j = E_prompts[1 - C(n - c, j) / C(n, j)]. A table goes to stdout, everything to `--output` JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_m2po.choices import BenchmarkName
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
    import yaml

    from megatron_m2po.models.hf_config import hf_config_dir

    for run_dir in (ckpt.parent.parent, ckpt.parent.parent.parent):
        config = run_dir / "config.yaml"
        if config.is_file():
            model_path = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("path")
            return hf_config_dir(model_path) if model_path else None
    return None


def resolve_hf_dir(
    checkpoint: str | Path, scratch: str | Path, hf_config_dir: str | Path | None = None
) -> Path:
    """The HF model dir to serve: `checkpoint` itself, or a Megatron checkpoint converted into `scratch`.

    Megatron checkpoints: a converter dir (`m2po_checkpoint.json`), or a training checkpoint
    `RUN/checkpoints/step_N` (or its `dist/`), whose config and tokenizer come from `hf_config_dir`,
    else from the HF model the run started from (RUN/config.yaml).
    """
    from megatron_m2po.checkpoint.megatron_ckpt import is_megatron_checkpoint

    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} is not a directory (an HF model dir or a Megatron checkpoint)"
        )
    dist = path / "dist" if (path / "dist" / "metadata.json").is_file() else path
    if is_megatron_checkpoint(path) or (dist / "metadata.json").is_file():
        from megatron_m2po.checkpoint.convert import convert_megatron_to_hf

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
    """A farm serving the model, built as the trainer builds its own (`rollout.build.build_engines`, with
    its API-key environment variables): local in process, vLLM in process or by URL, SGLang servers by URL
    or an sglang-router (`router_url`) in front of them."""
    import torch

    from megatron_m2po.config import Config
    from megatron_m2po.rollout.build import build_engines
    from megatron_m2po.rollout.farm import EngineFarm

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
    return EngineFarm(build_engines(cfg, str(hf_dir), torch.float32))


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
    limit = asyncio.Semaphore(concurrency)

    async def one(prompt) -> list[Sample]:
        async with limit:  # the engine seeds each request from params.seed (the run seed) and the prompt id
            samples = await engine.generate(prompt.prompt_id, prompt.prompt_ids, n, params)
        if on_prompt_done is not None:
            on_prompt_done()
        return samples

    return list(await asyncio.gather(*(one(p) for p in prompts)))


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
        from megatron_m2po.data.benchmarks import get_benchmark

        b = get_benchmark(name)
        return cls(b.path, **b.fields, name=b.name)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


def open_dataset(
    spec: FileSpec, tokenizer, *, template: str, apply_chat_template: bool, max_prompts: int = 0
):
    """The set's prompts in file order (first `max_prompts` when > 0), with its field mapping."""
    from megatron_m2po.data.prompts import PromptDataset

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
) -> list[FileResult]:
    """Sample every prompt of every file `responses_per_prompt` times and score them; one result per file.
    `on_prompt_done()` as each prompt's samples arrive."""
    from transformers import AutoTokenizer

    from megatron_m2po.rollout.rewards import RewardPool

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
                            )
                        )
                finally:
                    await farm.close()

            asyncio.run(all_files())
    return results


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
) -> FileResult:
    start = time.perf_counter()
    _, prompts = open_dataset(
        spec, tokenizer, template=template, apply_chat_template=apply_chat_template, max_prompts=max_prompts
    )
    groups = await generate_all(farm, prompts, n, params, concurrency, on_prompt_done)
    texts = [s.response_text for g in groups for s in g]
    answers = [p.answer for p, g in zip(prompts, groups) for _ in g]
    scores = await rewards.score_async(texts, answers)
    correct = [[score >= FULL_REWARD for score in scores[i * n : (i + 1) * n]] for i in range(len(prompts))]
    metrics = summarize(correct, ks)
    metrics["mean_response_tokens"] = sum(len(s.response_ids) for g in groups for s in g) / max(1, len(texts))
    metrics["truncated_fraction"] = sum(s.finish_reason == "length" for g in groups for s in g) / max(
        1, len(texts)
    )
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


def format_table(results: Sequence[FileResult]) -> str:
    """A markdown table: one row per file, one column per metric, and the mean over files."""
    if not results:
        return "(no results)"
    metric_names = [k for k in results[0].metrics if k.startswith(("avg@", "pass@"))]
    header = ["file", "prompts", *metric_names, "seconds"]
    rows = [
        [
            r.name,
            str(int(r.metrics["num_prompts"])),
            *(f"{100 * r.metrics[m]:.1f}" for m in metric_names),
            f"{r.seconds:.1f}",
        ]
        for r in results
    ]
    if len(results) > 1:
        rows.append(
            [
                "mean",
                "",
                *(f"{100 * sum(r.metrics[m] for r in results) / len(results):.1f}" for m in metric_names),
                "",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in [header, *rows]]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="HF model dir, Megatron checkpoint dir, or a training checkpoint RUN/checkpoints/step_N",
    )
    parser.add_argument(
        "--hf-config-dir", help="config + tokenizer for a training checkpoint (default: the run's model.path)"
    )
    parser.add_argument(
        "--benchmark",
        nargs="+",
        default=[],
        choices=BENCHMARK_NAMES,
        metavar="NAME",
        help=f"benchmarks shipped with the package, by name: {', '.join(BENCHMARK_NAMES)}",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        help="your own prompt sets: .jsonl / .parquet files (or names the `datasets` library loads)",
    )
    parser.add_argument("--problem-key", default="problem", help="--data: row field of the problem")
    parser.add_argument("--answer-key", default="answer", help="--data: row field of the answer")
    parser.add_argument(
        "--answer-format",
        choices=("plain", "boxed", "gsm8k"),
        default="plain",
        help="--data: how the answer field is read",
    )
    parser.add_argument(
        "--template",
        default="m2po",
        help="prompt template with {problem}, or a name: 'plain', 'm2po' (the paper's; default)",
    )
    parser.add_argument(
        "--no-chat-template", action="store_true", help="do not wrap prompts in the chat template"
    )
    parser.add_argument(
        "-k", "--responses-per-prompt", type=int, default=1, help="samples per prompt (avg@k)"
    )
    parser.add_argument(
        "--pass-k", type=int, nargs="*", default=None, help="pass@j values to report (default: 1 and k)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default: 0 = greedy for k=1, else 1.0 as the paper)",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--max-new-tokens", type=int, default=2560, help="response length limit (tokens)")
    parser.add_argument(
        "--seed", type=int, default=0, help="run seed: each request's sampling seed derives from it"
    )
    parser.add_argument("--engine", choices=ENGINES, default="local", help="rollout engine")
    parser.add_argument("--url", nargs="*", default=[], help="sglang or vllm server base URLs")
    parser.add_argument(
        "--router-url", default="", help="sglang: an sglang-router in front of the --url servers"
    )
    parser.add_argument(
        "--max-prompts", type=int, default=0, help="evaluate the first N prompts of each file"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="prompts in flight")
    parser.add_argument(
        "--reward-fn",
        default="megatron_m2po.rollout.rewards:math_reward",
        help="reward `module:function(response, answer)`; 1.0 = correct",
    )
    parser.add_argument("--reward-workers", type=int, default=2, help="reward processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the local engine")
    parser.add_argument("--output", help="JSON result path (default: <checkpoint>/eval.json)")
    parser.add_argument("--keep-responses", action="store_true", help="also store every response in the JSON")


def run(args: argparse.Namespace) -> int:
    if not args.benchmark and not args.data:
        raise SystemExit(f"m2po evaluate: name --benchmark ({', '.join(BENCHMARK_NAMES)}) and/or --data FILE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    k = args.responses_per_prompt
    temperature = args.temperature if args.temperature is not None else (0.0 if k == 1 else 1.0)
    if k > 1 and temperature == 0:
        logger.warning("-k %d with greedy decoding: every sample is the same", k)
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p, seed=args.seed
    )
    files = [FileSpec.benchmark(name) for name in args.benchmark]
    files += [FileSpec(Path(p), args.problem_key, args.answer_key, args.answer_format) for p in args.data]
    results = evaluate(
        args.checkpoint,
        files,
        responses_per_prompt=k,
        pass_ks=args.pass_k or [1, k],
        sampling=sampling,
        engine=args.engine,
        urls=args.url,
        router_url=args.router_url,
        template=args.template,
        apply_chat_template=not args.no_chat_template,
        max_prompts=args.max_prompts,
        concurrency=args.concurrency,
        reward_fn=args.reward_fn,
        reward_workers=args.reward_workers,
        keep_responses=args.keep_responses,
        threads=args.threads,
        hf_config_dir=args.hf_config_dir,
    )
    print(format_table(results))
    output = Path(args.output) if args.output else Path(args.checkpoint) / "eval.json"
    payload = {
        "checkpoint": str(args.checkpoint),
        "engine": args.engine,
        "sampling": asdict(sampling),
        "responses_per_prompt": k,
        "template": args.template,
        "results": [asdict(r) for r in results],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2))
    print(f"wrote {output}")
    return 0
