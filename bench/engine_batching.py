"""LocalEngine: concurrent requests decoded as one batch vs one request at a time, in the same run.

    OMP_NUM_THREADS=1 python -m bench.engine_batching                # 16 prompts x 8 samples, 12 new tokens
    OMP_NUM_THREADS=1 python -m bench.engine_batching --reps 1       # quick
    OMP_NUM_THREADS=1 python -m bench.engine_batching --before bca40bf   # also the engine as of that commit

What a fixed-mode training update asks of the engine: the rollout manager submits `--prompts` requests at
once (one per prompt, n = `--samples` each). The model is the demo's (megatron_m2po/commands/demo.py DEMO_MODEL,
~0.9M parameters, untrained), the prompts the demo's first training problems in its template. Every sample
decodes exactly `--max-new-tokens` tokens (no stop tokens), so both variants do the same work:

- batched: `LocalEngine(max_batch_rows=256)`, the default: all requests' rows decode together;
- alone: `LocalEngine(max_batch_rows=0)`: one request (its n rows) at a time, as before batching (but
  with this engine's one prefill row per prompt and one-call sampling of all rows);
- before (with `--before COMMIT`): megatron_m2po/rollout/engines/local.py as of COMMIT, loaded from git.

Seconds per round (all requests answered) are medians over `--reps`, the variants interleaved so machine
noise hits both alike, after one warm-up round each; "forwards" counts the model calls of one round.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (queue.py): keep it off the import path, put the repo on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402

from megatron_m2po.commands.demo import prepare_task  # noqa: E402
from megatron_m2po.data.arithmetic import DEMO_TEMPLATE  # noqa: E402
from megatron_m2po.data.prompts import PromptDataset  # noqa: E402
from megatron_m2po.rollout.engines.local import LocalEngine  # noqa: E402
from megatron_m2po.types import SamplingParams  # noqa: E402

VARIANTS = {"batched": 256, "alone": 0}  # max_batch_rows


def engine_at(commit: str) -> type:
    """LocalEngine as it was at `commit` (its module source from git, run against today's other modules)."""
    path = "megatron_m2po/rollout/engines/local.py"
    source = subprocess.run(
        ["git", "show", f"{commit}:{path}"],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"local_at_{commit}")
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module.LocalEngine


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed, stop_token_ids=[]
    )
    with tempfile.TemporaryDirectory() as tmp:
        data, base = prepare_task(Path(tmp), seed=args.seed)
        engines = {
            k: LocalEngine(base, engine_id=k, threads=args.threads, max_batch_rows=v)
            for k, v in VARIANTS.items()
        }
        if args.before:
            engines["before"] = engine_at(args.before)(base, engine_id="before", threads=args.threads)
        dataset = PromptDataset(
            data["train"], engines["alone"].tokenizer, template=DEMO_TEMPLATE, shuffle=False
        )
        prompts = [dataset[i] for i in range(args.prompts)]
        forwards = {k: 0 for k in engines}
        for name, engine in engines.items():
            engine.model.register_forward_hook(
                lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1)
            )

        async def round_s(engine: LocalEngine) -> float:
            start = time.perf_counter()
            await asyncio.gather(
                *(engine.generate(p.prompt_id, p.prompt_ids, args.samples, params) for p in prompts)
            )
            return time.perf_counter() - start

        times: dict[str, list[float]] = {k: [] for k in engines}
        for rep in range(args.reps + 1):  # the first round warms up both
            for name, engine in engines.items():
                forwards[name] = 0
                seconds = asyncio.run(round_s(engine))
                if rep:
                    times[name].append(seconds)
        for engine in engines.values():
            asyncio.run(engine.close())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "prompts": args.prompts,
        "samples": args.samples,
        "new_tokens": args.max_new_tokens,
        "prompt_tokens": sorted({len(p.prompt_ids) for p in prompts}),
        "batched_s": med["batched"],
        "alone_s": med["alone"],
        "batched_forwards": forwards["batched"],
        "alone_forwards": forwards["alone"],
        "ratio": med["alone"] / med["batched"],
        **(
            {"before_s": med["before"], "before_ratio": med["before"] / med["batched"]} if args.before else {}
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="requests submitted at once")
    p.add_argument("--samples", type=int, default=8, help="n of each request")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--before", metavar="COMMIT", help="also time the engine as of this git commit")
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result, indent=1))
    print(
        f"{args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} tokens: batched "
        f"{result['batched_s']:.3f} s ({result['batched_forwards']} forwards), one request at a time "
        f"{result['alone_s']:.3f} s ({result['alone_forwards']} forwards): {result['ratio']:.1f}x"
    )
    if args.before:
        print(f"engine as of {args.before}: {result['before_s']:.3f} s: {result['before_ratio']:.1f}x")


if __name__ == "__main__":
    main()
