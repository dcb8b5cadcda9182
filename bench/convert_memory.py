"""Peak host memory of the HF <-> Megatron converters vs the model size, measured in fresh processes.

    python -m bench.convert_memory [--layers 12 --hidden 512 --shard-mb 16]
    python -m bench.convert_memory --experts 16 --layers 4 --hidden 256   # Qwen3-MoE; then --experts 64

Each phase runs in its own interpreter; a sampling thread reads /proc/self/status (RssAnon every 2 ms,
VmHWM at the end). Baselines in the same run: an interpreter that only imports the project ("imports"),
and a naive converter that loads the whole HF checkpoint into memory ("load whole model"). Reported:
peak anonymous memory above the imports baseline, as a fraction of the model's weight bytes. With
`--experts N` the model is a Qwen3-MoE (top-2, expert FFN = hidden, EP = 2): runs with growing N show
whether the converters' peak grows with the number of experts (it should stay flat: they stream expert by
expert).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds modules named like stdlib ones (queue.py); don't let this script's folder shadow them
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

PHASE_CODE = r"""
import json, os, sys, threading, time
os.environ["OMP_NUM_THREADS"] = "1"
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0
peak = {"anon": 0}
stop = False
def sample():
    while not stop:
        peak["anon"] = max(peak["anon"], status("RssAnon"))
        time.sleep(0.002)
import torch
from megatron_m2po.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_m2po import platform
platform.init_distributed()
phase, hf_dir, work, shard, ep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
start_anon = status("RssAnon")
thread = threading.Thread(target=sample, daemon=True); thread.start()
if phase == "load_whole_model":
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    fused = {k: v.clone() for k, v in tensors.items()}  # a converter that holds the model (and its re-layout)
    del fused
elif phase == "hf_to_megatron":
    convert_hf_to_megatron(
        hf_dir, os.path.join(work, "megatron"), tensor_parallel=2, pipeline_parallel=2, expert_parallel=ep
    )
elif phase == "megatron_to_hf":
    convert_megatron_to_hf(os.path.join(work, "megatron"), os.path.join(work, "back"), max_shard_bytes=shard)
time.sleep(0.01)
stop = True; thread.join()
print(json.dumps({"start_anon": start_anon, "peak_anon": peak["anon"], "peak_rss": status("VmHWM")}))
"""


def run_phase(phase: str, hf_dir: Path, work: Path, shard: int, ep: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", PHASE_CODE, phase, str(hf_dir), str(work), str(shard), str(ep)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--shard-mb", type=float, default=16.0)
    parser.add_argument(
        "--experts", type=int, default=0, help="a Qwen3-MoE with this many experts (0: dense)"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_m2po.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        moe = {"num_experts": args.experts, "moe_intermediate_size": args.hidden} if args.experts else {}
        hf_dir = make_tiny_model(
            "qwen3_moe" if args.experts else "qwen3",
            tmp / "hf",
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=args.hidden // 8,
            vocab_size=8192,
            **moe,
        )
        model_bytes = (hf_dir / "model.safetensors").stat().st_size
        largest = max(
            4 * args.hidden * 4 * args.hidden * 2, 8192 * args.hidden * 4
        )  # fc1 (gate+up) or embedding
        shard = int(args.shard_mb * 1024**2)
        arch = f"qwen3-moe ({args.experts} experts)" if args.experts else "qwen3"
        print(
            f"model: {arch} {args.layers} layers, hidden {args.hidden}: {model_bytes / 2**20:.1f} MiB of weights"
        )
        print(
            f"largest single tensor {largest / 2**20:.1f} MiB, output shard limit {shard / 2**20:.1f} MiB\n"
        )
        print(f"{'phase':<18} {'peak anon above start':>22} {'/ model':>8} {'peak RSS':>10}")
        for phase in ("imports", "load_whole_model", "hf_to_megatron", "megatron_to_hf"):
            r = run_phase(phase, hf_dir, tmp, shard, 2 if args.experts else 1)
            extra = r["peak_anon"] - r["start_anon"]
            print(
                f"{phase:<18} {extra / 2**20:>18.1f} MiB {extra / model_bytes:>8.2f} {r['peak_rss'] / 2**20:>6.0f} MiB"
            )


if __name__ == "__main__":
    main()
