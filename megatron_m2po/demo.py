"""`m2po demo`: the whole system on a laptop CPU in a few minutes, from nothing.

1. generate a 2-digit addition task (train / validation / held-out splits, `data/arithmetic.py`);
2. build a tiny Qwen3 (`models/tiny.py`) and warm-start it by supervised learning until greedy
   validation accuracy reaches a partial level (`sft.py`);
3. measure held-out accuracy (greedy, through the evaluation tool and the local engine);
4. train it with M2PO on stale rollouts (fixed lag: every batch was generated 2 updates earlier) with
   the real trainer (`train.py`: Megatron-core policy, local engine, replay queue, weight sync);
5. measure held-out accuracy again, plot the run (`m2po plot`), and print as the last line
   `accuracy: BEFORE -> AFTER`.

Everything goes under `--out` (default runs/demo); the RL recipe is examples/cpu_demo/config.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from megatron_m2po.data.arithmetic import DEMO_TEMPLATE, make_splits, write_splits

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "examples" / "cpu_demo" / "config.yaml"

# ~0.9M parameters: big enough to learn 2-digit addition in a few hundred steps, small enough that
# an RL update of 128 sequences takes about a second on one core.
DEMO_MODEL = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 256,
}
MAX_NEW_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (data, models, the RL run)")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="RL recipe (default: examples/cpu_demo)"
    )
    parser.add_argument(
        "--rl-steps", type=int, default=None, help="RL steps (default: the recipe's train.steps)"
    )
    parser.add_argument(
        "--sft-target", type=float, default=0.3, help="stop the warm start at this greedy validation accuracy"
    )
    parser.add_argument("--sft-max-steps", type=int, default=1500, help="warm-start step limit")
    parser.add_argument("--sft-lr", type=float, default=3e-3, help="warm-start learning rate")
    parser.add_argument(
        "--heldout", type=int, default=300, help="held-out problems the accuracy is measured on"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the tiny matrices gain little from more, and oversubscribed cores lose a lot)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the task split, model init and sampling")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a shortened smoke run (tests): 20 warm-start steps, 2 RL steps, 30 held-out problems",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the RL recipe")


def heldout_accuracy(hf_dir: Path, heldout: Path, max_prompts: int, threads: int) -> float:
    """Greedy accuracy of an HF model dir on the task's held-out problems (the first `max_prompts`; 0: all)."""
    from megatron_m2po.evaluation import FileSpec, evaluate
    from megatron_m2po.types import SamplingParams

    results = evaluate(
        hf_dir,
        [FileSpec(heldout)],
        samples_per_prompt=1,
        sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, seed=0),
        template=DEMO_TEMPLATE,
        max_prompts=max_prompts,
        concurrency=16,
        reward_workers=1,
        threads=threads,
    )
    return results[0].metrics["avg@1"]


def prepare_task(out: Path, *, seed: int = 0, heldout: int = 300) -> tuple[dict[str, Path], Path]:
    """The arithmetic task's split files under out/data and the random tiny model out/base."""
    from megatron_m2po.models.tiny import make_tiny_model

    data = write_splits(out / "data", make_splits(seed=seed, num_heldout=heldout))
    base = make_tiny_model("qwen3", out / "base", seed=seed, **DEMO_MODEL)
    return data, base


def warm_start_model(
    base: Path,
    out: Path,
    data: dict[str, Path],
    *,
    lr: float = 3e-3,
    seed: int = 0,
    max_steps: int = 1500,
    target: float = 0.3,
    check_every: int = 50,
) -> dict:
    """Supervised warm start of the base model to partial greedy validation accuracy; saved to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_m2po.data.prompts import PromptDataset
    from megatron_m2po.evaluation import stop_token_ids
    from megatron_m2po.sft import greedy_accuracy, response_ids, save_hf, warm_start

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    train = PromptDataset(data["train"], tokenizer, template=DEMO_TEMPLATE, shuffle=False)
    validation = PromptDataset(data["validation"], tokenizer, template=DEMO_TEMPLATE, shuffle=False)
    pairs = [(p.prompt_ids, response_ids(tokenizer, f"\\boxed{{{p.answer}}}")) for p in train]
    val_prompts = [validation[i] for i in range(len(validation))]
    stops = stop_token_ids(tokenizer)

    def validate(m) -> float:
        return greedy_accuracy(m, tokenizer, val_prompts, max_new_tokens=MAX_NEW_TOKENS, stop_ids=stops)

    result = warm_start(
        model,
        pairs,
        validate,
        lr=lr,
        seed=seed,
        pad_id=tokenizer.pad_token_id,
        max_steps=max_steps,
        target_accuracy=target,
        check_every=check_every,
    )
    save_hf(model, tokenizer, out)
    return {
        "steps": result.steps,
        "validation_accuracy": result.validation_accuracy,
        "history": result.history,
    }


def _rl(args, out: Path, warm: Path, data: dict[str, Path]):
    from megatron_m2po import platform
    from megatron_m2po.config import load_config
    from megatron_m2po.train import train

    overrides = [
        f"model.path={warm}",
        f"data.path={data['train']}",
        f"eval.path={data['heldout']}",
        f"logging.run_dir={out / 'rl'}",
        f"train.seed={args.seed}",
        f"train.torch_threads={args.threads}",
        "checkpoint.export_hf_at_end=true",
    ]
    if args.rl_steps is not None:
        overrides.append(f"train.steps={args.rl_steps}")
    if args.quick:
        overrides += ["train.steps=2", "eval.every=0", "logging.console=none"]
    cfg = load_config(args.config, [*overrides, *args.overrides])
    try:
        train(cfg)
    finally:
        platform.destroy_distributed()
    return cfg


def run(args: argparse.Namespace) -> int:
    from megatron_m2po.plot import plot_run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out).resolve()
    heldout_n = 30 if args.quick else args.heldout
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        logger.info("demo: %s done in %.1fs", name, now - since)
        return now

    data, base = prepare_task(out, seed=args.seed, heldout=args.heldout)
    t = lap("setup", t0)

    warm = out / "warmstart"
    limits = {"max_steps": 20, "check_every": 10, "target": 2.0} if args.quick else {}
    sft = warm_start_model(
        base,
        warm,
        data,
        **{
            "lr": args.sft_lr,
            "seed": args.seed,
            "max_steps": args.sft_max_steps,
            "target": args.sft_target,
            **limits,
        },
    )
    t = lap("warm_start", t)

    before = heldout_accuracy(warm, data["heldout"], heldout_n, args.threads)
    t = lap("eval_before", t)

    cfg = _rl(args, out, warm, data)
    t = lap("rl", t)

    trained = Path(cfg.logging.run_dir) / "hf"
    after = heldout_accuracy(trained, data["heldout"], heldout_n, args.threads)
    t = lap("eval_after", t)

    plot = plot_run(cfg.logging.run_dir, out / "curves.png")
    lap("plot", t)
    timings["total"] = round(time.perf_counter() - t0, 1)

    result = {
        "accuracy_before": before,
        "accuracy_after": after,
        "heldout_problems": heldout_n,
        "decoding": "greedy",
        "warm_start": sft,
        "rl_steps": cfg.train.steps,
        "staleness": {"mode": cfg.staleness.mode, "updates": cfg.fixed_staleness},
        "loss": cfg.algorithm.loss,
        "timings_s": timings,
        "model": str(trained),
        "plot": str(plot),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(
        f"warm start: {sft['steps']} supervised steps, validation accuracy {sft['validation_accuracy']:.2f}"
    )
    print(
        f"RL: {cfg.train.steps} steps of {cfg.algorithm.loss}, staleness {cfg.fixed_staleness} updates "
        f"({cfg.staleness.mode}); timings (s): {timings}"
    )
    print(f"trained model: {trained}; curves: {plot}; summary: {out / 'demo_result.json'}")
    print(f"held-out accuracy (greedy, {heldout_n} problems never trained on):")
    print(f"accuracy: {before:.2f} -> {after:.2f}")
    return 0
