"""`m2po demo`: the whole system on a laptop CPU in a few minutes, from nothing.

1. generate a 2-digit addition task (train / validation / held-out splits, `data/arithmetic.py`);
2. build a tiny Qwen3 (`models/tiny.py`) and warm-start it by supervised learning until greedy
   validation accuracy reaches a partial level (`sft.py`);
3. measure held-out accuracy (greedy, through `m2po evaluate`'s library and the local engine) while the RL stage's
   engine server boots;
4. train it with M2PO asynchronously (`bounded` staleness: a local engine server process generates while
   this process trains, each batch at most 2 updates stale) with the real trainer (`train.py`:
   Megatron-core policy, replay queue, weight sync), and measure how much of the RL stage's wall time
   generation and training ran at the same time (`CoreMeter`);
5. measure held-out accuracy again, plot the run (`m2po plot`), and print as the last line
   `accuracy: BEFORE -> AFTER`.

Everything goes under `--out` (default runs/demo); the RL recipe is examples/cpu_demo/config.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_m2po import console, platform
from megatron_m2po.commands import tool_demo
from megatron_m2po.commands.plot import plot_run
from megatron_m2po.commands.sft import greedy_accuracy, response_ids, save_hf, warm_start
from megatron_m2po.config import load_config
from megatron_m2po.data.arithmetic import DEMO_TEMPLATE, SPLITS, make_splits, write_splits
from megatron_m2po.data.prompts import PromptDataset
from megatron_m2po.metrics import read_scalars
from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
from megatron_m2po.rollout.evaluation import FileSpec, evaluate, stop_token_ids
from megatron_m2po.staleness import mode_named
from megatron_m2po.train import train
from megatron_m2po.types import SamplingParams

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
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
    parser.add_argument("--sft-batch", type=int, default=64, help="warm-start problems per step")
    parser.add_argument(
        "--heldout", type=int, default=300, help="held-out problems the accuracy is measured on"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the tiny matrices gain little from more, and oversubscribed cores lose a lot)",
    )
    parser.add_argument(
        "--engine",
        choices=["process", "thread"],
        default="process",
        help="RL generation: an engine server process (the SGLang API, weights from disk after each update) "
        "or the recipe's in-process engine thread (shares the trainer's interpreter lock)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the task split, model init and sampling")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="fact",
        help="how the task's problems are split: 'fact' keeps every twin of a held-out problem (b+a for a+b) "
        "out of training; 'problem' splits by question string alone (figures measured before 'fact')",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a shortened smoke run (tests): 20 warm-start steps, 2 RL steps, 30 held-out problems",
    )
    parser.add_argument(
        "--env",
        choices=["math", "tool_math"],
        default="math",
        help="math: 2-digit addition, one turn (the default demo); tool_math: 3-digit x 2-digit multiplication "
        "with a sandboxed Python tool (docs/environments.md)",
    )
    tool_demo.add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the RL recipe")


def heldout_accuracy(hf_dir: Path, heldout: Path, max_prompts: int, threads: int, name: str) -> float:
    """Greedy accuracy of an HF model dir on the task's held-out problems (the first `max_prompts`)."""
    with console.StageBar(name, max_prompts) as bar:
        done = [0]

        def on_prompt_done() -> None:
            done[0] += 1
            bar.update(done[0])

        results = evaluate(
            hf_dir,
            [FileSpec(heldout)],
            responses_per_prompt=1,
            sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, seed=0),
            template=DEMO_TEMPLATE,
            max_prompts=max_prompts,
            concurrency=max_prompts,  # all in flight: the local engine decodes them as one batch
            reward_workers=1,
            threads=threads,
            on_prompt_done=on_prompt_done,
        )
        bar.update(max_prompts, accuracy=results[0].metrics["avg@1"])
    return results[0].metrics["avg@1"]


class CoreMeter:
    """How much of a stage's wall time generation and training ran at the same time, from CPU time.

    A background thread samples, every `interval` seconds, the CPU seconds of this process's main thread
    (the trainer: updates, weight sync) and of the engine server processes `engine_pids` (decoding), and
    sums per interval the time both must have run: max(0, busy_train + busy_generate - 1) x interval, each
    busy fraction being CPU seconds / interval (at most 1: one core each). CPU time never exceeds busy time,
    so `both_s` is a lower bound (on a machine shared with other work, a low one).
    """

    def __init__(self, engine_pids: list[int], interval: float = 0.5) -> None:
        """`engine_pids` empty: the engine runs in this process, and its generation is every thread but the
        main one and this meter's (the engine's worker, the rollout loop, the reward pool's pipes)."""
        self._process, self._interval = psutil.Process(), interval
        self._engines = [psutil.Process(pid) for pid in engine_pids]
        self._main = threading.main_thread().native_id
        self.train_s = self.generate_s = self.both_s = self.wall_s = 0.0
        self._last = (0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="core-meter", daemon=True)

    def _cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (the main thread, the engine processes)."""
        threads = {t.id: t.user_time + t.system_time for t in self._process.threads()}
        train = threads.pop(self._main, 0.0)
        threads.pop(self._thread.native_id, None)
        generate = 0.0 if self._engines else sum(threads.values())
        for engine in self._engines:
            try:
                times = engine.cpu_times()
                generate += times.user + times.system
            except psutil.NoSuchProcess:  # stopped at the end of the stage
                pass
        return train, generate

    def _sample(self) -> tuple[float, float]:
        """CPU seconds used since the previous sample by (the trainer, generation)."""
        (train, generate), (train0, generate0) = self._cpu(), self._last
        self._last = (train, max(generate, generate0))
        return train - train0, max(0.0, generate - generate0)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            train, generate = self._sample()
            span, last = now - last, now
            self.train_s += train
            self.generate_s += generate
            self.both_s += max(0.0, min(1.0, train / span) + min(1.0, generate / span) - 1.0) * span

    def __enter__(self) -> CoreMeter:
        self._sample()  # the CPU time so far (imports, model loads) is not this stage's
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.wall_s = time.monotonic() - self._t0

    def summary(self) -> dict[str, float]:
        return {
            "wall_s": round(self.wall_s, 1),
            "train_cpu_s": round(self.train_s, 1),
            "generate_cpu_s": round(self.generate_s, 1),
            "both_busy_s": round(self.both_s, 1),
            "both_busy_fraction": round(self.both_s / max(self.wall_s, 1e-9), 3),
            "cores_used": round((self.train_s + self.generate_s) / max(self.wall_s, 1e-9), 2),
        }


def prepare_task(
    out: Path, *, seed: int = 0, heldout: int = 300, split: str = "fact"
) -> tuple[dict[str, Path], Path]:
    """The arithmetic task's split files under out/data (`split`: see `make_splits`) and the random tiny
    model out/base."""
    data = write_splits(out / "data", make_splits(seed=seed, num_heldout=heldout, split=split))
    base = make_tiny_model("qwen3", out / "base", seed=seed, **DEMO_MODEL)
    return data, base


def warm_start_model(
    base: Path,
    out: Path,
    data: dict[str, Path],
    *,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    max_steps: int = 1500,
    target: float = 0.3,
    check_every: int = 25,
) -> dict:
    """Supervised warm start of the base model to partial greedy validation accuracy; saved to `out`.

    A check (greedy decoding of the 200 validation problems) costs about two steps of 64 problems,
    and accuracy climbs steeply once it starts (0.12 -> 0.38 in 50 steps): checking every 25 steps stops
    closer to the target than every 50."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    train_set = PromptDataset(data["train"], tokenizer, template=DEMO_TEMPLATE, shuffle=False)
    validation = PromptDataset(data["validation"], tokenizer, template=DEMO_TEMPLATE, shuffle=False)
    pairs = [(p.prompt_ids, response_ids(tokenizer, f"\\boxed{{{p.answer}}}")) for p in train_set]
    val_prompts = [validation[i] for i in range(len(validation))]
    stops = stop_token_ids(tokenizer)

    def validate(m) -> float:
        return greedy_accuracy(m, tokenizer, val_prompts, max_new_tokens=MAX_NEW_TOKENS, stop_ids=stops)

    with console.StageBar("warm start", max_steps, log_every=check_every) as bar:

        def on_step(step: int, loss: float, accuracy: float | None) -> None:
            bar.update(step, loss=loss, **({"validation accuracy": accuracy} if accuracy is not None else {}))

        result = warm_start(
            model,
            pairs,
            validate,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            pad_id=tokenizer.pad_token_id,
            max_steps=max_steps,
            target_accuracy=target,
            check_every=check_every,
            on_step=on_step,
        )
    save_hf(model, tokenizer, out)
    return {
        "steps": result.steps,
        "validation_accuracy": result.validation_accuracy,
        "history": result.history,
        "lr": lr,
        "batch_size": batch_size,
    }


def _rl_overrides(args, out: Path, warm: Path, data: dict[str, Path]) -> list[str]:
    """The RL recipe's overrides pointing it at this demo's files and options (the command line's follow)."""
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
    return overrides


@contextmanager
def _booting_engine(args, out: Path, warm: Path):
    """The RL stage's engine server process (`--engine process`: the local engine behind the SGLang HTTP API,
    as a GPU node runs SGLang), started in the background so that it boots on the other core while this
    process measures the held-out accuracy before RL. Yields the launcher and a function that waits until the
    server is healthy; the server stops on exit."""
    engines = EngineLauncher(warm, servers=1, backend="local", log_dir=out / "engine_logs")
    with ThreadPoolExecutor(1, thread_name_prefix="engine-boot") as pool:
        boot = pool.submit(engines.start) if args.engine == "process" else None
        try:
            yield engines, (boot.result if boot is not None else list)
        finally:
            try:
                if boot is not None:
                    with suppress(Exception):  # an error on the way: let the boot end, then stop it
                        boot.result()
            finally:
                engines.stop()


def _rl(args, overrides: list[str], engines, urls: list[str]):
    """The RL stage: the engine server at `urls` (none: the recipe's in-process engine thread) generates while
    this process trains; weights reach it from disk after every update."""
    engine = ["rollout.engine=sglang", f"rollout.urls={json.dumps(urls)}"] if urls else []
    cfg = load_config(args.config, [*overrides, *engine, *args.overrides])
    try:
        with CoreMeter([proc.pid for proc in engines.procs.values()]) as meter:
            train(cfg)
    finally:
        platform.destroy_distributed()
    return cfg, meter.summary()


def _loop_seconds(run_dir: str) -> dict[str, float]:
    """The RL loop's own clock (TensorBoard `perf/time_*`, summed over steps): training, and waiting for data."""
    scalars = read_scalars(run_dir)
    total = {name: sum(v for _, v in scalars.get(f"perf/time_{name}", [])) for name in ("train", "wait")}
    return {"loop_train_s": round(total["train"], 1), "loop_wait_s": round(total["wait"], 1)}


def _max_staleness(cfg) -> int:
    """The most updates a consumed batch can lag: fixed's exact lag, bounded's bound, 0 for sync."""
    return mode_named(cfg.staleness.mode).staleness_bound(cfg)


def run(args: argparse.Namespace) -> int:
    if args.env == "tool_math":
        return tool_demo.run_tool_demo(args)
    console.setup(getattr(args, "verbose", False))
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

    data, base = prepare_task(out, seed=args.seed, heldout=args.heldout, split=args.split)
    warm = out / "warmstart"
    overrides = _rl_overrides(args, out, warm, data)
    load_config(args.config, [*overrides, *args.overrides])  # a bad recipe fails here, before the warm start
    t = lap("setup", t0)

    limits = {"max_steps": 20, "check_every": 10, "target": 2.0} if args.quick else {}
    sft = warm_start_model(
        base,
        warm,
        data,
        **{
            "lr": args.sft_lr,
            "batch_size": args.sft_batch,
            "seed": args.seed,
            "max_steps": args.sft_max_steps,
            "target": args.sft_target,
            **limits,
        },
    )
    t = lap("warm_start", t)

    with _booting_engine(args, out, warm) as (engines, ready):
        before = heldout_accuracy(warm, data["heldout"], heldout_n, args.threads, "held-out before RL")
        t = lap("eval_before", t)
        cfg, overlap = _rl(args, overrides, engines, ready())
        t = lap("rl", t)

    trained = Path(cfg.logging.run_dir) / "hf"
    after = heldout_accuracy(trained, data["heldout"], heldout_n, args.threads, "held-out after RL")
    t = lap("eval_after", t)

    overlap.update(_loop_seconds(cfg.logging.run_dir))
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
        "staleness": {"mode": cfg.staleness.mode, "max_updates": _max_staleness(cfg)},
        "rl_overlap": overlap,
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
        f"RL: {cfg.train.steps} steps of {cfg.algorithm.loss}, staleness <= {_max_staleness(cfg)} updates "
        f"({cfg.staleness.mode}); timings (s): {timings}"
    )
    print(
        f"RL overlap: generation and training ran at the same time for at least {overlap['both_busy_s']:.0f} s "
        f"of {overlap['wall_s']:.0f} s ({overlap['both_busy_fraction']:.0%}); {overlap['cores_used']:.2f} "
        f"cores busy on average (generation {overlap['generate_cpu_s']:.0f} s, training "
        f"{overlap['train_cpu_s']:.0f} s of CPU); the trainer trained {overlap['loop_train_s']:.0f} s and "
        f"waited {overlap['loop_wait_s']:.0f} s for rollouts"
    )
    print(f"trained model: {trained}; curves: {plot}; summary: {out / 'demo_result.json'}")
    print(f"held-out accuracy (greedy, {heldout_n} problems never trained on):")
    print(f"accuracy: {before:.2f} -> {after:.2f}")
    return 0
