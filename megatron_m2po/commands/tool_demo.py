"""`m2po demo --env tool_math`: tool-integrated reasoning on a laptop CPU, from nothing.

1. generate a multiplication task (3-digit x 2-digit: the tiny model cannot multiply in its head;
   `data/arithmetic.multiplication_splits`) and build the demo's tiny Qwen3;
2. warm-start it on traces, `--tool-fraction` of them tool-call traces (a `python` call that prints the
   product, the sandbox's reply, `\\boxed{product}`) and the rest direct answers; each model turn of a
   trace is one supervised pair with the conversation before it as context, so the tool's reply is read,
   never trained on (the loss mask of RL, in supervised form);
3. measure held-out greedy accuracy with the tool (`rollout.env=tool_math`, the real sandbox) and without
   it (every call answered "not run"), the same with the tool at the RL temperature, and the fraction of
   answers that used the tool;
4. RL with the tool environment (examples/cpu_demo/tool_math.yaml: M2PO, bounded staleness, the trainer
   and the in-process engine), and measure again.

Everything goes under `--out` (default runs/demo_tool); the last line is `accuracy: BEFORE -> AFTER`, the
held-out accuracy with the tool before and after RL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_m2po import console, platform
from megatron_m2po.commands.sft import greedy_continuations, response_ids, save_hf, warm_start
from megatron_m2po.config import load_config
from megatron_m2po.data.arithmetic import DEMO_TEMPLATE, boxed, multiplication_splits, write_splits
from megatron_m2po.data.prompts import PromptDataset
from megatron_m2po.event_loop import LoopThread
from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.environments import ToolMath
from megatron_m2po.rollout.environments.tool_calls import CALL_CLOSE, CALL_OPEN
from megatron_m2po.rollout.environments.tool_math import PYTHON_TOOL, ToolMathSettings
from megatron_m2po.rollout.environments.trajectory import EnvTurnRenderer
from megatron_m2po.rollout.evaluation import environment_eval_metrics, rollout_all, stop_token_ids
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.rollout.rewards import RewardPool
from megatron_m2po.rollout.tools import SandboxPool, ToolResult
from megatron_m2po.train import train
from megatron_m2po.types import SamplingParams

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TOOL_CONFIG = REPO / "examples" / "cpu_demo" / "tool_math.yaml"
# The demo's tiny Qwen3 (commands/demo.py DEMO_MODEL), with room for a prompt, a tool call, its reply and
# the answer (about 150 tokens of the character-level tokenizer).
MAX_POSITIONS = 320


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tool demo's own options (`m2po demo --env tool_math ...`)."""
    parser.add_argument("--tool-config", default=str(TOOL_CONFIG), help="RL recipe of the tool demo")
    parser.add_argument(
        "--tool-fraction", type=float, default=0.5, help="share of the warm-start traces that call the tool"
    )
    parser.add_argument(
        "--tool-sft-steps", type=int, default=1500, help="most warm-start steps of the tool demo"
    )
    parser.add_argument(
        "--tool-sft-target",
        type=float,
        default=0.5,
        help="the tool demo's warm start stops when this fraction of validation traces is written right",
    )
    parser.add_argument(
        "--tool-sft-batch", type=int, default=32, help="warm-start pairs per step of the tool demo"
    )
    parser.add_argument(
        "--tool-heldout", type=int, default=100, help="held-out problems the tool demo's figures use"
    )


def call_text(problem: str) -> str:
    """The tool call a trace makes for `problem`: print the product."""
    call = {"name": PYTHON_TOOL, "arguments": {"code": f"print({problem})"}}
    return CALL_OPEN + json.dumps(call) + CALL_CLOSE


def trace_pairs(
    tokenizer, renderer: EnvTurnRenderer, prompt, *, use_tool: bool
) -> list[tuple[list[int], list[int]]]:
    """(context ids, model-turn ids) pairs of one warm-start trace: the environment's turn is context only.

    The tool's reply is what `ToolResult.as_text` gives the model at RL time for `print(product)`."""
    answer = response_ids(tokenizer, boxed(prompt.answer))
    if not use_tool:
        return [(prompt.prompt_ids, answer)]
    call = response_ids(tokenizer, call_text(prompt.text.rstrip("=")))
    reply = ToolResult(stdout=f"{prompt.answer}\n", stderr="", exit_code=0).as_text()
    env = renderer.messages_ids([{"role": "tool", "content": reply}], call)
    return [(prompt.prompt_ids, call), (prompt.prompt_ids + call + env, answer)]


def tool_skill_check(problems: list, tokenizer, renderer: EnvTurnRenderer):
    """The warm start's stopping check, on validation problems: the fraction whose tool trace the model
    writes greedily, both turns, given the trace so far (the call after `<tool_call>`, and the answer after
    the tool's reply). Copying the reply into the answer appears suddenly, after a number of steps that
    varies with the seed (300 to 1000 seen), so the warm start runs until it has, not for fixed steps."""
    traces = [trace_pairs(tokenizer, renderer, p, use_tool=True) for p in problems]
    opened = len(tokenizer(CALL_OPEN, add_special_tokens=False)["input_ids"])
    calls = [(ctx + turn[:opened], turn[opened:]) for (ctx, turn), _ in traces]
    answers = [pair for _, pair in traces]
    stops = stop_token_ids(tokenizer)

    def written_right(model, turns) -> list[bool]:
        written = greedy_continuations(
            model,
            [ctx for ctx, _ in turns],
            max_new_tokens=max(len(expected) for _, expected in turns),
            stop_ids=stops,
            pad_id=tokenizer.pad_token_id,
        )
        return [w == expected for w, (_, expected) in zip(written, turns)]

    def check(model) -> float:
        both = zip(written_right(model, calls), written_right(model, answers))
        return sum(call and answer for call, answer in both) / len(problems)

    return check


def tool_settings(cfg) -> ToolMathSettings:
    return ToolMath.parse_settings(cfg.rollout.env_settings)


SAMPLES_PER_PROBLEM = 2  # trajectories per held-out problem for the figures at the RL recipe's temperature


def heldout_figures(hf_dir: Path, heldout: Path, n: int, cfg, pool: SandboxPool, threads: int) -> dict:
    """Held-out figures of the model at `hf_dir` on the first `n` problems: greedy accuracy with the tool
    (the RL recipe's tool environment) and without it (every call answered "not run"), and with the tool
    at the recipe's sampling temperature (`SAMPLES_PER_PROBLEM` trajectories a problem: what RL samples,
    so what it improves first); each with the fraction of answers that used the tool (a call ran) or
    tried to (a call block written)."""
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = PromptDataset(heldout, tokenizer, template=DEMO_TEMPLATE, shuffle=False)
    prompts = [prompts[i] for i in range(min(n, len(prompts)))]
    greedy = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=0.0,
        seed=0,
        stop_token_ids=stop_token_ids(tokenizer),
    )
    sampled = dataclasses.replace(greedy, temperature=cfg.rollout.temperature, seed=cfg.train.seed)
    loop = LoopThread("tool-demo-eval")
    rewards = RewardPool(workers=1, timeout=30)
    farm = EngineFarm([LocalEngine(hf_dir, engine_id="eval", threads=threads)])
    try:
        out = {}
        settings = tool_settings(cfg)
        tool_env = ToolMath(farm, rewards, tokenizer, greedy, settings, sandbox=pool)
        # The tiny model's chat template has no place to say whether a tool is offered, so "without" is the
        # tool environment with no call allowed: each call is answered "not run" and the model answers on
        # its next turn from its own head (scoring the call block itself, as one turn would, says nothing).
        disabled = dataclasses.replace(settings, max_tool_calls=0)
        without_tool = ToolMath(farm, rewards, tokenizer, greedy, disabled, sandbox=pool)
        for name, env, samples in (
            ("with_tool", tool_env.for_evaluation(greedy), 1),  # as the run's periodic evaluation answers
            ("without_tool", without_tool.for_evaluation(greedy), 1),
            ("sampled_with_tool", tool_env.for_evaluation(sampled), SAMPLES_PER_PROBLEM),
        ):
            # every trajectory in flight at once (the engine batches their turns)
            groups = loop.run(rollout_all(env, prompts, samples, concurrency=max(1, len(prompts))))
            answers = [s for g in groups for s in g]
            tried = [CALL_OPEN in s.response_text for s in answers]
            out[name] = {
                "accuracy": sum(s.reward >= 1.0 for s in answers) / len(answers),
                "used_tool_fraction": environment_eval_metrics(env).get("used_tool_fraction", 0.0),
                "called_tool_fraction": sum(tried) / len(answers),
            }
        return out
    finally:
        loop.run(farm.close())
        loop.stop()
        rewards.close()


def run_tool_demo(args: argparse.Namespace) -> int:
    console.setup(getattr(args, "verbose", False))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out if args.out != "runs/demo" else "runs/demo_tool").resolve()
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        logger.info("tool demo: %s done in %.1fs", name, now - since)
        return now

    quick = args.quick
    data = write_splits(
        out / "data", multiplication_splits(seed=args.seed, num_heldout=max(args.tool_heldout, 10))
    )
    from megatron_m2po.commands.demo import DEMO_MODEL  # here: demo.py imports this module

    dims = {**DEMO_MODEL, "max_position_embeddings": MAX_POSITIONS}
    base = make_tiny_model("qwen3", out / "base", seed=args.seed, **dims)
    warm = out / "warmstart"
    overrides = [
        f"model.path={warm}",
        f"data.path={data['train']}",
        f"logging.run_dir={out / 'rl'}",
        f"train.seed={args.seed}",
        f"train.torch_threads={args.threads}",
        *(["train.steps=2", "logging.console=none"] if quick else []),
        *([f"train.steps={args.rl_steps}"] if args.rl_steps is not None else []),
        *args.overrides,
    ]
    cfg = load_config(args.tool_config, overrides)  # a bad recipe fails here, before the warm start
    t = lap("setup", t)

    tokenizer = AutoTokenizer.from_pretrained(base)
    renderer = EnvTurnRenderer(tokenizer, stop_token_ids(tokenizer))
    rng = random.Random(args.seed)
    train_set = PromptDataset(data["train"], tokenizer, template=DEMO_TEMPLATE, shuffle=False)
    pairs = [
        pair
        for i in range(len(train_set))
        for pair in trace_pairs(tokenizer, renderer, train_set[i], use_tool=rng.random() < args.tool_fraction)
    ]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    validation = PromptDataset(data["validation"], tokenizer, template=DEMO_TEMPLATE, shuffle=False)
    validate = tool_skill_check([validation[i] for i in range(len(validation))], tokenizer, renderer)
    steps = 10 if quick else args.tool_sft_steps
    with console.StageBar("warm start (tool traces)", steps, log_every=25) as bar:
        result = warm_start(
            model,
            pairs,
            validate,
            lr=args.sft_lr,
            batch_size=args.tool_sft_batch,
            seed=args.seed,
            pad_id=tokenizer.pad_token_id,
            max_steps=steps,
            target_accuracy=args.tool_sft_target,
            check_every=min(steps, 50),
            on_step=lambda step, loss, right: bar.update(
                step, loss=loss, **({} if right is None else {"traces_right": right})
            ),
            mean_per_pair=True,  # the answer's few digits weigh as much as the call's many tokens
        )
    save_hf(model, tokenizer, warm)
    t = lap("warm_start", t)

    n = 10 if quick else args.tool_heldout
    with SandboxPool(cfg.sandbox) as pool:
        before = heldout_figures(warm, data["heldout"], n, cfg, pool, args.threads)
        t = lap("eval_before", t)
        try:
            train(cfg)
        finally:
            platform.destroy_distributed()
        t = lap("rl", t)
        trained = Path(cfg.logging.run_dir) / "hf"
        after = heldout_figures(trained, data["heldout"], n, cfg, pool, args.threads)
        t = lap("eval_after", t)
    timings["total"] = round(time.perf_counter() - t0, 1)

    summary = {
        "task": "a*b, a of 3 digits, b of 2 (multiplication_splits)",
        "heldout_problems": n,
        "decoding": "greedy; sampled_with_tool: the RL recipe's temperature",
        "sampled_temperature": cfg.rollout.temperature,
        "samples_per_problem": SAMPLES_PER_PROBLEM,
        "warm_start": {
            "steps": result.steps,
            "pairs": len(pairs),
            "tool_fraction": args.tool_fraction,
            "validation_traces_right": result.validation_accuracy,
            "history": result.history,
        },
        "rl_steps": cfg.train.steps,
        "loss": cfg.algorithm.loss,
        "before_rl": before,
        "after_rl": after,
        "timings_s": timings,
        "model": str(trained),
    }
    (out / "demo_result.json").write_text(json.dumps(summary, indent=2))
    for when, figures in (("before RL", before), ("after RL", after)):
        w, wo, ws = figures["with_tool"], figures["without_tool"], figures["sampled_with_tool"]
        print(
            f"{when}: accuracy with the tool {w['accuracy']:.2f} (answers that used it: "
            f"{w['used_tool_fraction']:.2f}), without the tool {wo['accuracy']:.2f}; sampled at temperature "
            f"{cfg.rollout.temperature:g}: with the tool {ws['accuracy']:.2f} (used it: {ws['used_tool_fraction']:.2f})"
        )
    print(f"timings (s): {timings}; summary: {out / 'demo_result.json'}")
    print(f"accuracy: {before['with_tool']['accuracy']:.2f} -> {after['with_tool']['accuracy']:.2f}")
    return 0
