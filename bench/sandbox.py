"""Per-call overhead of the sandboxed Python tool, against a plain `python -c pass` subprocess.

    python -m bench.sandbox [--calls 40] [--workers 4]

Each row runs `--calls` calls of `pass`, interleaved round-robin so load on a shared machine hits all
alike, and prints the median wall seconds per call and its ratio to the baseline measured in the same run:
  - baseline: `subprocess.run([python, "-c", "pass"])` (the same interpreter, site-packages loaded)
  - sandbox, isolated: a `Sandbox.run("pass")` call (launcher, six namespaces, private mounts, rlimits)
  - sandbox, unisolated: the same launcher and limits without namespaces (`allow_unisolated`'s mode)
  - setup: the part of an isolated call before the code's interpreter starts, as the launcher reports it
Then throughput: `--calls` calls of `pass` through a `SandboxPool` of `--workers` at once.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from megatron_m2po.config import SandboxConfig  # noqa: E402
from megatron_m2po.rollout.tools import Sandbox, SandboxPool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()

    config = SandboxConfig(workers=args.workers)
    isolated = Sandbox(config)
    if not isolated.capabilities.isolated:
        sys.exit(f"this machine cannot isolate: {isolated.capabilities.describe()}")
    unisolated = Sandbox(config)
    unisolated.isolate = False

    def plain() -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        return time.perf_counter() - t0

    def sandboxed(sandbox: Sandbox) -> tuple[float, float]:
        t0 = time.perf_counter()
        result = sandbox.run("pass")
        elapsed = time.perf_counter() - t0
        assert result.ok, result
        return elapsed, result.setup_seconds

    setups: list[float] = []
    runs = {"plain": [], "isolated": [], "unisolated": []}
    for _ in range(args.calls):
        runs["plain"].append(plain())
        elapsed, setup = sandboxed(isolated)
        runs["isolated"].append(elapsed)
        setups.append(setup)
        runs["unisolated"].append(sandboxed(unisolated)[0])
    base = statistics.median(runs["plain"])
    print(f"{'per call (median of ' + str(args.calls) + ')':<40} {'ms':>8} {'x plain':>8}")
    print(f"{'baseline: python -c pass':<40} {1000 * base:8.1f} {1.0:8.2f}")
    for name in ("isolated", "unisolated"):
        t = statistics.median(runs[name])
        print(f"{'sandbox, ' + name:<40} {1000 * t:8.1f} {t / base:8.2f}")
    setup = statistics.median(setups)
    print(f"{'  of which namespace + mount setup':<40} {1000 * setup:8.1f} {setup / base:8.2f}")

    with SandboxPool(config) as pool:
        t0 = time.perf_counter()
        results = [f.result() for f in [pool.submit("pass") for _ in range(args.calls)]]
        elapsed = time.perf_counter() - t0
    assert all(r.ok for r in results)
    t0 = time.perf_counter()
    for _ in range(args.calls):
        plain()
    serial = time.perf_counter() - t0
    print(
        f"pool of {args.workers}: {args.calls / elapsed:.1f} calls/s; "
        f"serial plain subprocesses: {args.calls / serial:.1f} /s"
    )


if __name__ == "__main__":
    main()
