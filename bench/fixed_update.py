"""Fixed-mode update cost of this tree against a base commit: the same short fixed-lag training run from a base
commit and from this working tree, both started at once so the machine's noise falls on both alike.

    python -m bench.fixed_update                                  # base bca40bf, s = 4, 40 updates
    python -m bench.fixed_update --baseline-ref HEAD~2 --updates 20
    python -m bench.fixed_update --baseline-ref HEAD~1 --lag 0 --updates 64 --eval-every 64 --eval-prompts 1000 \
        --model TASK/warmstart --data TASK/data             # a staleness-sweep run's shape (sync, s = 0)

Both runs: the CPU demo recipe (examples/cpu_demo/config.yaml of each tree: m2po, 16 prompts x 8 samples per
update, one micro-batch of 128, the local engine, one torch thread) on the demo's task, from a tiny
warm-started model built here once (a short supervised warm start, so responses have the demo's length), with
`staleness.mode=fixed`, `fixed_lag_steps=4` (one update per step: s = 4), evaluation and checkpoints off.
"before" runs from `git archive` of the base commit (its own package on PYTHONPATH), "after" from this tree
(or from `--after-ref`'s commit).

The figures are the runs' own clocks (TensorBoard `perf/time_*`, `megatron_m2po.metrics.read_scalars`) over
the steps after the first (the first fills the FIFO with K + 1 batches): seconds per update (`time_step`), and
its parts: generation in line (`time_generate`), training (`time_train`), waiting for data (`time_wait`:
the queue, and in the after run the overlapped generation's remainder), weight sync (`time_sync`); the after
run's `time_generate_overlapped` is its generation beside the updates. Beside them, each run's CPU seconds
(user + system, its reward workers included) per update over the whole process, start-up and evaluations
included: on a machine other jobs share, wall clocks measure the share each run got, CPU time its work.

`--lag 0` runs `sync` mode (s = 0, the sweep's on_policy shape); `--eval-every` / `--eval-prompts` add the
held-out evaluations, on `--data`'s heldout.jsonl (a folder with train.jsonl and heldout.jsonl, e.g. a
sweep's `task*/data`). `same_numbers`: whether the two runs logged the same value for every scalar that is
not a clock (loss, ratios, rewards, gradient norm, held-out accuracy...) at every step, and wrote the same
per-problem evaluations; the differing tags are listed. A change that should not alter the numbers must
leave it true, up to what differs between two runs of one tree (the local engine batches concurrent
requests as they arrive, so rounding in the behaviour log-probs can differ: run the base against itself,
`--after-ref` = the base, to see that).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_m2po.metrics import read_scalars  # noqa: E402

PARTS = ("time_generate", "time_train", "time_wait", "time_sync", "time_generate_overlapped")


TIMING = ("perf/", "time", "seconds", "latency", "per_s", "_ms")


def warm_model(out: Path, steps: int) -> tuple[Path, dict[str, Path]]:
    """The demo's task files and a briefly warm-started tiny model under `out` (built once, then reused; not
    built for `steps` = 0)."""
    from megatron_m2po.commands.demo import prepare_task, warm_start_model

    data, base = prepare_task(out)
    warm = out / f"warmstart_{steps}"
    if steps and not (warm / "config.json").is_file():
        # all `steps` (target 2.0 is never reached); validation only picks an early stop: 8 prompts keep it cheap
        few = out / "validation_8.jsonl"
        few.write_text("".join(data["validation"].read_text().splitlines(keepends=True)[:8]))
        warm_start_model(
            base, warm, {**data, "validation": few}, max_steps=steps, check_every=steps, target=2.0
        )
    return warm, data


def checkout(ref: str, dest: Path) -> str:
    """The tree of commit `ref` at `dest` (git archive: the shared checkout and its worktree list are left
    alone); returns the full commit id."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if commit.returncode != 0:
        sys.exit(f"--baseline-ref {ref}: not a commit of {REPO} ({commit.stderr.strip()})")
    dest.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(REPO), "archive", commit.stdout.strip()], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        sys.exit(f"git archive {ref} failed")
    return commit.stdout.strip()


def side_env(tree: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(tree))


def check_imports_from(tree: Path) -> None:
    """The run must train with `tree`'s package, not the editable install's."""
    where = subprocess.run(
        [sys.executable, "-c", "import megatron_m2po; print(megatron_m2po.__file__)"],
        cwd=tree,
        env=side_env(tree),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"{tree}: python imports megatron_m2po from {where}, not from this tree")


def start(tree: Path, run_dir: Path, warm: Path, data: dict[str, Path], args, log: Path) -> subprocess.Popen:
    mode = "fixed" if args.lag else "sync"
    overrides = [
        f"model.path={warm}",
        f"data.path={data['train']}",
        f"eval.path={data['heldout']}",
        f"eval.every={args.eval_every}",
        f"eval.max_prompts={args.eval_prompts}",
        f"logging.run_dir={run_dir}",
        "logging.console=none",
        f"staleness.mode={mode}",
        f"staleness.fixed_lag_steps={args.lag}",
        f"staleness.queue_capacity={16 * (args.lag + 2)}",
        f"train.steps={args.updates}",
        "checkpoint.save_at_end=false",
        *args.overrides,
    ]
    cmd = [
        sys.executable,
        "-m",
        "megatron_m2po",
        "train",
        "--config",
        "examples/cpu_demo/config.yaml",
        *overrides,
    ]
    return subprocess.Popen(cmd, cwd=tree, env=side_env(tree), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_cpu(proc: subprocess.Popen) -> tuple[int, float]:
    """The process's exit status and CPU seconds (user + system, its waited-for children included)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def numbers(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged scalar that is not a clock, by tag."""
    return {tag: points for tag, points in read_scalars(run_dir).items() if not any(t in tag for t in TIMING)}


def differing(before: Path, after: Path) -> list[str]:
    """Tags (and `eval_correct.csv`) whose values differ between the two runs."""
    a, b = numbers(before), numbers(after)
    tags = sorted(tag for tag in set(a) | set(b) if a.get(tag) != b.get(tag))
    evals = [
        (run / "eval_correct.csv").read_text() if (run / "eval_correct.csv").is_file() else ""
        for run in (before, after)
    ]
    return tags + (["eval_correct.csv"] if evals[0] != evals[1] else [])


def per_update(run_dir: Path) -> dict[str, float]:
    """Mean seconds per step after the first (one update per step in this recipe), overall and by part."""
    scalars = read_scalars(run_dir)
    steps = [s for s, _ in scalars["perf/time_step"] if s > 1]

    def mean(tag: str) -> float:
        values = [v for s, v in scalars.get(f"perf/{tag}", []) if s > 1]
        return sum(values) / len(values) if values else 0.0

    return {"steps": len(steps), "time_step": mean("time_step"), **{part: mean(part) for part in PARTS}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-ref", default="bca40bf", help="the base commit of the before run")
    parser.add_argument("--after-ref", help="a commit for the after run (default: this working tree)")
    parser.add_argument(
        "--updates", type=int, default=40, help="training steps of each run (one update each)"
    )
    parser.add_argument(
        "--lag", type=int, default=4, help="staleness.fixed_lag_steps (s, at one update per step)"
    )
    parser.add_argument(
        "--warm-steps", type=int, default=150, help="supervised warm-start steps of the model"
    )
    parser.add_argument(
        "--eval-every", type=int, default=0, help="held-out evaluation every N updates (0: none)"
    )
    parser.add_argument(
        "--eval-prompts", type=int, default=0, help="held-out problems per evaluation (0: all)"
    )
    parser.add_argument(
        "--data", help="a folder with train.jsonl and heldout.jsonl (default: the demo task's)"
    )
    parser.add_argument(
        "--model",
        help="an HF dir of the demo's model to use instead (e.g. a sweep's task/warmstart); read only",
    )
    parser.add_argument(
        "--out", default="runs/bench_fixed_update", help="work dir (the warm model is reused)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for both runs")
    args = parser.parse_args(argv)
    if args.updates < 2:
        parser.error("--updates must be >= 2: the first step (the FIFO's fill) is not counted")
    out = Path(args.out).resolve()
    warm, data = warm_model(out / "task", 0 if args.model else args.warm_steps)
    warm = Path(args.model).resolve() if args.model else warm
    if args.data:
        data = {split: Path(args.data).resolve() / f"{split}.jsonl" for split in ("train", "heldout")}
    with tempfile.TemporaryDirectory(prefix="fixed_update_") as tmp:
        trees = {"before": Path(tmp) / "before", "after": REPO}
        commit = checkout(args.baseline_ref, trees["before"])
        after = "working tree"
        if args.after_ref:
            trees["after"] = Path(tmp) / "after"
            after = checkout(args.after_ref, trees["after"])
        stamp = time.strftime("%Y%m%d_%H%M%S")
        run_dirs = {side: out / f"{stamp}_{side}" for side in trees}
        for tree in trees.values():
            check_imports_from(tree)
        t0 = time.monotonic()
        procs = {
            side: start(tree, run_dirs[side], warm, data, args, out / f"{stamp}_{side}.log")
            for side, tree in trees.items()
        }
        waited = {side: wait_cpu(proc) for side, proc in procs.items()}
        wall = time.monotonic() - t0
    codes = {side: code for side, (code, _) in waited.items()}
    failed = [side for side, code in codes.items() if code != 0]
    if failed:
        sys.exit(f"the {', '.join(failed)} run failed: see {out}/{stamp}_<side>.log")
    result = {
        side: per_update(run_dirs[side]) | {"cpu_s_per_update": waited[side][1] / args.updates}
        for side in trees
    }
    result["ratio_after_over_before"] = result["after"]["time_step"] / result["before"]["time_step"]
    result["cpu_ratio_after_over_before"] = (
        result["after"]["cpu_s_per_update"] / result["before"]["cpu_s_per_update"]
    )
    result["differing"] = differing(run_dirs["before"], run_dirs["after"])
    result["same_numbers"] = not result["differing"]
    result.update(
        baseline=commit,
        after_tree=after,
        updates=args.updates,
        lag=args.lag,
        eval_every=args.eval_every,
        eval_prompts=args.eval_prompts,
        wall_s=wall,
        overrides=args.overrides,
    )
    (out / f"{stamp}_result.json").write_text(json.dumps(result, indent=2))
    print(
        f"{'fixed' if args.lag else 'sync'} mode, s = {args.lag}, {args.updates} updates each, run side by side "
        f"({wall:.0f} s); mean over steps 2..{args.updates}, seconds per update:"
    )
    print(f"{'':8} {'step':>7}" + "".join(f" {part[5:]:>20}" for part in PARTS) + f" {'cpu':>7}")
    for side in trees:
        row = result[side]
        print(
            f"{side:8} {row['time_step']:7.2f}"
            + "".join(f" {row[part]:20.2f}" for part in PARTS)
            + f" {row['cpu_s_per_update']:7.3f}"
        )
    ratio, cpu_ratio = result["ratio_after_over_before"], result["cpu_ratio_after_over_before"]
    print(
        f"after / before = {ratio:.3f} (wall), {cpu_ratio:.3f} (CPU)  (before = {commit[:10]}, after = {after[:12]})"
    )
    print(
        "same numbers: yes"
        if result["same_numbers"]
        else f"same numbers: NO, differing: {result['differing']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
