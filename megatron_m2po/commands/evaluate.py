"""`m2po evaluate CHECKPOINT --benchmark NAME ... [--data FILE ...]`: accuracy (avg@k, pass@k) of a checkpoint.

CHECKPOINT is an HF model dir, a Megatron checkpoint dir, or a training checkpoint RUN/checkpoints/step_N.
`--benchmark` names the sets shipped with the package (`data.benchmarks`, each with its field mapping);
`--data` reads your own files with `--problem-key/--answer-key/--answer-format`. Every prompt is sampled
`-k` times through the chosen engine and scored by the reward function (`megatron_m2po.rollout.evaluation`).
A table goes to stdout, everything to `--output` JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import typing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from megatron_m2po import console
from megatron_m2po.choices import EnvName
from megatron_m2po.rollout.evaluation import BENCHMARK_NAMES, ENGINES, FileResult, FileSpec, evaluate
from megatron_m2po.types import SamplingParams

logger = logging.getLogger(__name__)
ENV_NAMES = typing.get_args(EnvName)


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
    parser.add_argument(
        "--env",
        choices=ENV_NAMES,
        default="math",
        help="the rollout.env answering each prompt: math (one model turn) or tool_math (model turns with the "
        "Python tool in a sandbox, as a tool_math run's rollouts; greedy unless --temperature)",
    )
    parser.add_argument(
        "--env-settings",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="the environment's rollout.env_settings as a JSON object, e.g. '{\"max_turns\": 4}'",
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
    console.setup(getattr(args, "verbose", False))  # --verbose: other libraries' messages too
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
        env=args.env,
        env_settings=args.env_settings,
    )
    print(format_table(results))
    output = Path(args.output) if args.output else Path(args.checkpoint) / "eval.json"
    payload = {
        "checkpoint": str(args.checkpoint),
        "engine": args.engine,
        "sampling": asdict(sampling),
        "responses_per_prompt": k,
        "template": args.template,
        "env": args.env,
        "env_settings": args.env_settings or {},
        "results": [asdict(r) for r in results],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2))
    print(f"wrote {output}")
    return 0
