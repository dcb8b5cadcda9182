"""Asynchronous training speed-up: `sync` vs `bounded` staleness mode, same task, same run of this script.

In `sync` mode generation and training alternate, so a step costs T_gen + T_train. In `bounded` mode a
background producer generates the next batches while the trainer trains, so the ideal step costs
max(T_gen, T_train): the ideal speed-up is (T_gen + T_train) / max(T_gen, T_train), measured from the
sync run's own time split. We report the measured speed-up (sync wall time / bounded wall time over the
same number of optimizer updates, first step excluded as warm-up) as a fraction of that ideal.

    python -m bench.async                       # CPU demo setup: tiny model, local engine, 1 thread each
    python -m bench.async --steps 8 --hidden 128

On 2 cores the engine and the trainer get one torch thread each (`train.torch_threads=1`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_m2po.metrics import read_scalars  # noqa: E402


def write_task(root: Path, args) -> Path:
    from megatron_m2po.data.arithmetic import all_problems, write_jsonl
    from megatron_m2po.models.tiny import make_tiny_model

    model = make_tiny_model(
        "qwen3",
        root / "model",
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
    )
    prompts = write_jsonl(all_problems(max_operand=39), root / "prompts.jsonl")  # a+b for 0 <= a, b < 40
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
model: {{path: {model}}}
data: {{path: {prompts}, max_prompt_tokens: 64}}
rollout: {{max_new_tokens: {args.max_new_tokens}, reward_workers: 1}}
algorithm: {{loss: m2po}}
train: {{steps: {args.steps}, groups_per_step: {args.prompts}, groups_per_update: {args.prompts // args.updates_per_step},
         responses_per_prompt: {args.responses}, micro_batch_size: {args.responses * args.prompts // args.updates_per_step},
         lr: 1.0e-4, torch_threads: 1}}
checkpoint: {{save_at_end: false}}
logging: {{console: none}}
""")
    return recipe


def run_mode(recipe: Path, run_dir: Path, mode_overrides: list[str], args, engine_overrides: list[str]) -> dict:
    """One run with `mode_overrides` (staleness.mode=... and that mode's settings); its timings after warm-up."""
    overrides = [f"logging.run_dir={run_dir}", *mode_overrides, *engine_overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "megatron_m2po", "train", "--config", str(recipe), *overrides]
    t0 = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(mode_overrides)} run failed:\n{proc.stderr[-4000:]}")
    s = read_scalars(run_dir)

    def total(tag: str) -> float:
        return sum(
            v for step, v in s.get(tag, []) if step > 1
        )  # step 1 = warm-up (first fill, first compile)

    return {
        "wall": total("perf/time_step"),
        "generate": total("perf/time_generate") + total("perf/time_sync"),
        "train": total("perf/time_train"),
        "wait": total("perf/time_wait"),
        "updates": (args.steps - 1) * args.updates_per_step,
        # CPU the whole run got (startup included) per second of its run time: on an idle 2-core machine the
        # bounded run can use ~2; on a loaded one it cannot, and no overlap can show.
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "run_seconds": time.monotonic() - t0,
    }


def measure(recipe: Path, root: Path, name: str, args, engine_overrides: list[str]) -> dict:
    load_before = f"{os.getloadavg()[0]:.2f}"
    sync = run_mode(recipe, root / f"{name}-sync", ["staleness.mode=sync"], args, engine_overrides)
    bounded_overrides = [
        "staleness.mode=bounded",
        f"staleness.max_staleness={2 * args.updates_per_step}",
        f"rollout.sync_every={args.updates_per_step}",
    ]
    bounded = run_mode(recipe, root / f"{name}-bounded", bounded_overrides, args, engine_overrides)
    ideal = (sync["generate"] + sync["train"]) / max(sync["generate"], sync["train"])
    speedup = sync["wall"] / bounded["wall"]
    print(f"\n[{name}] {sync['updates']} updates per mode after warm-up")
    print(
        f"  sync:    wall {sync['wall']:.2f} s = generate+sync {sync['generate']:.2f} s + train {sync['train']:.2f} s"
    )
    print(
        f"  bounded: wall {bounded['wall']:.2f} s (train {bounded['train']:.2f} s, waiting for data {bounded['wait']:.2f} s)"
    )
    for mode, r in (("sync", sync), ("bounded", bounded)):
        print(
            f"  {mode}: cores used {r['cpu_seconds'] / r['run_seconds']:.2f} (CPU s / wall s of the whole run)"
        )
    print(
        f"  load average before / after: {load_before} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    print(
        f"  speed-up {speedup:.2f}x; ideal (T_gen + T_train) / max(T_gen, T_train) = {ideal:.2f}x; "
        f"fraction of ideal {speedup / ideal:.2f}"
    )
    return {
        "sync": sync,
        "bounded": bounded,
        "ideal_speedup": ideal,
        "speedup": speedup,
        "fraction_of_ideal": speedup / ideal,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="training steps per mode (the first is warm-up)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--updates-per-step", type=int, default=2)
    p.add_argument("--responses", type=int, default=8, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument(
        "--engines",
        choices=("server", "inprocess", "both"),
        default="inprocess",
        help="server: the local engine in its own process (HTTP, weights via disk); inprocess: in the "
        "trainer process (weights as tensors; shares the GIL with the trainer)",
    )
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args()

    from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher

    results = {}
    with tempfile.TemporaryDirectory(prefix="m2po-bench-async-") as tmp:
        root = Path(tmp)
        recipe = write_task(root, args)
        if args.engines in ("inprocess", "both"):
            results["inprocess"] = measure(recipe, root, "inprocess", args, ["rollout.engine=local"])
        if args.engines in ("server", "both"):
            with EngineLauncher(
                root / "model", servers=1, backend="local", log_dir=root / "logs"
            ) as launcher:
                urls = "[" + ",".join(launcher.urls) + "]"
                results["server"] = measure(
                    recipe, root, "server", args, ["rollout.engine=sglang", f"rollout.urls={urls}"]
                )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
