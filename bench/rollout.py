"""Rollout-side costs, each against a baseline measured in the same run.

    python -m bench.rollout [--hidden 512 --layers 8] [--requests 200] [--repeats 5]

1. Weight sync: `WeightSync.push_collective` (Megatron model -> iter_hf_tensors gather -> bounded buckets ->
   LocalEngine in-place load, version bump) vs a plain in-memory copy of the same bytes into
   preallocated tensors (the floor any in-process sync must pay). Also the disk transport
   (safetensors dir written and loaded), same baseline.
2. Farm overhead: EngineFarm.generate (routing, bookkeeping, retry wrapper) vs calling the same
   LocalEngine directly, for short requests (4 new tokens, so the overhead is not hidden by compute).
Prints a markdown table; medians over `--repeats`.
"""

from __future__ import annotations

import sys

# bench/queue.py would shadow the standard library's `queue` (used by concurrent.futures): drop this dir.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_m2po.checkpoint import iter_hf_tensors, load_policy  # noqa: E402
from megatron_m2po.models import load_hf_config  # noqa: E402
from megatron_m2po.models.tiny import make_tiny_model  # noqa: E402
from megatron_m2po.platform import destroy_distributed, init_distributed  # noqa: E402
from megatron_m2po.rollout.engines.local import LocalEngine  # noqa: E402
from megatron_m2po.rollout.farm import EngineFarm  # noqa: E402
from megatron_m2po.sync import WeightSync  # noqa: E402
from megatron_m2po.types import SamplingParams  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_sync(args, hf_dir: Path, rows: list[str]) -> None:
    init_distributed()
    model = load_policy(hf_dir, dtype=torch.float32)
    hf_config = load_hf_config(hf_dir)
    engine = LocalEngine(hf_dir, engine_id="bench")
    # baseline: copy exactly the tensors the sync sends into preallocated destination tensors
    sources = [t.detach().clone() for _, t in iter_hf_tensors(model, hf_config)]
    dests = [torch.empty_like(t) for t in sources]
    n_bytes = sum(t.numel() * t.element_size() for t in sources)

    def plain_copy():
        for d, s in zip(dests, sources):
            d.copy_(s)

    base = median_time(plain_copy, args.repeats)
    sync = WeightSync(model, hf_config, [engine], bucket_bytes=args.bucket_mb << 20)
    version = iter(range(1, 10**6))
    t_sync = median_time(lambda: sync.push_collective(next(version)), args.repeats)
    sync.close()
    with tempfile.TemporaryDirectory() as d:
        disk = WeightSync(
            model, hf_config, [engine], transport="disk", disk_dir=d, bucket_bytes=args.bucket_mb << 20
        )
        t_disk = median_time(lambda: disk.push_collective(next(version)), args.repeats)
        disk.close()
    asyncio.run(engine.close())
    destroy_distributed()
    mb = n_bytes / 1e6
    rows.append(
        f"| weight sync, tensors transport ({mb:.1f} MB fp32) | {t_sync * 1e3:.1f} ms | plain copy {base * 1e3:.1f} ms | {t_sync / base:.1f}x |"
    )
    rows.append(
        f"| weight sync, disk transport ({mb:.1f} MB fp32) | {t_disk * 1e3:.1f} ms | plain copy {base * 1e3:.1f} ms | {t_disk / base:.1f}x |"
    )


def bench_farm(args, hf_dir: Path, rows: list[str]) -> None:
    """Interleaved A/B rounds (direct, farm, direct, farm, ...) so load drift on a shared machine cancels."""
    engine = LocalEngine(hf_dir, engine_id="bench")
    farm = EngineFarm([engine])
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    prompt = list(range(10, 26))

    async def rounds():
        direct, routed = [], []
        for i in range(args.requests):
            t0 = time.perf_counter()
            await engine.generate(f"d{i}", prompt, 1, params)
            t1 = time.perf_counter()
            await farm.generate(f"f{i}", prompt, 1, params)
            t2 = time.perf_counter()
            direct.append(t1 - t0)
            routed.append(t2 - t1)
        return direct, routed

    asyncio.run(rounds())  # warm-up
    direct, routed = asyncio.run(rounds())
    overhead_ms = farm.metrics()["rollout/farm_overhead_ms"]
    asyncio.run(engine.close())
    t_direct, t_farm = statistics.median(direct), statistics.median(routed)
    rows.append(
        f"| farm request (1 engine, 4 new tokens, tiny model) | {t_farm * 1e3:.2f} ms | direct engine call "
        f"{t_direct * 1e3:.2f} ms | {t_farm / t_direct:.3f}x; farm's own bookkeeping {overhead_ms * 1e3:.0f} us/request |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bucket-mb", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        hf_dir = make_tiny_model(
            "qwen3",
            Path(d) / "model",
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=args.hidden // 8,
        )
        rows = ["| what | time | baseline (same run) | ratio |", "| --- | --- | --- | --- |"]
        bench_sync(args, hf_dir, rows)
        bench_farm(args, make_tiny_model("qwen3", Path(d) / "tiny"), rows)
    print(
        f"qwen3 hidden={args.hidden} layers={args.layers}, CPU, 1 torch thread, bucket {args.bucket_mb} MB, "
        f"median of {args.repeats}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
