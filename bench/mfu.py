"""Training-step MFU of the real trainer update on one GPU: bf16, random weights, packed, the m2po loss.

    python -m bench.mfu                          # GPU: Qwen3-1.7B shapes (28 layers), then Qwen3-8B shapes (4 layers)
    python -m bench.mfu --models qwen3-1.7b --budgets 32768 16384
    python -m bench.mfu --models qwen3-30b-a3b   # GPU: a Qwen3-30B-A3B layer stack (2 of its 48 MoE layers)
    OMP_NUM_THREADS=1 python -m bench.mfu --small   # CPU: tiny shapes, checks the flow (no MFU without a GPU)

Each model is built by `build_model` with random weights at the model's real layer shapes (no checkpoint),
wrapped and stepped by the trainer itself (`trainer.policy.Policy.update`: the M2 pre-pass, Megatron's schedule,
the loss, the optimizer step). The mini-batch: responses with the paper's long-tailed lengths (log-normal,
median 600, capped at 2560) behind 512-token prompts, packed into micro-batches of `--budgets` tokens,
the largest that fits (an out-of-memory budget is skipped for the next smaller one).

FLOPs per real token are counted as a Megatron paper would: 2 x (matmul parameters incl. the output
layer) per forward token plus causal attention 2 x 2 x heads x head_dim x (s + 1) / 2 per layer for a
token of a sequence of length s; the training step is forward + backward = 3 x, the M2 pre-pass one more
forward. An MoE layer counts what a token runs through: the router and its top-k experts (not every expert).
The MoE stack runs on one GPU with every expert local (EP = 1): grouped GEMM, the alltoall dispatcher. `mfu` uses the training step's FLOPs, `mfu_with_prepass` adds the pre-pass; both divide by the
GPU's dense bf16 peak (`metrics.PEAK_BF16_FLOPS`).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/ holds scripts named like stdlib modules (queue.py): keep it off the import path, put the repo on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.packing import make_groups, response_lengths  # noqa: E402
from megatron_m2po import platform  # noqa: E402
from megatron_m2po.config import Config  # noqa: E402
from megatron_m2po.metrics import gpu_peak_flops  # noqa: E402
from megatron_m2po.models.tiny import tiny_config  # noqa: E402

# HF config overrides with the published layer shapes (num_hidden_layers: the bench's default depth).
SHAPES = {
    "qwen3-1.7b": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": dict(
        arch="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    ),
    "small": dict(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
    ),
    "small-moe": dict(
        arch="qwen3_moe", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
    ),
}  # fmt: skip


def flops_per_step(shape: dict, seq_lengths: list[int]) -> tuple[float, float]:
    """(forward FLOPs of the mini-batch, of which attention), per the module docstring."""
    h, layers, head_dim = shape["hidden_size"], shape["num_hidden_layers"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    if "num_experts" in shape:  # router + the top-k experts a token goes through
        mlp = h * shape["num_experts"] + 3 * h * shape["moe_intermediate_size"] * shape["num_experts_per_tok"]
    else:
        mlp = 3 * h * shape["intermediate_size"]
    per_layer = h * q + 2 * h * kv + q * h + mlp
    matmul_params = layers * per_layer + shape["vocab_size"] * h  # + the output layer
    tokens = sum(seq_lengths)
    attention = sum(2 * 2 * q * s * (s + 1) / 2 for s in seq_lengths) * layers
    return 2 * matmul_params * tokens + attention, attention


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    from megatron_m2po.models import build_model, load_hf_config
    from megatron_m2po.trainer.policy import Policy

    shape = dict(SHAPES[name])
    arch = shape.pop("arch", "qwen3")
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    hf_dir = tmp / name
    tiny_config(arch, max_position_embeddings=8192, **shape).save_pretrained(hf_dir)
    prompt = args.prompt
    lengths = response_lengths(args.sequences, args.scale, args.seed)
    groups = make_groups(lengths, prompt, args.group, shape["vocab_size"], args.seed)
    seq_lengths = [prompt + n for n in lengths]
    fwd, attention = flops_per_step(shape, seq_lengths)
    peak = gpu_peak_flops(platform.gpu_name())
    out: dict = {"model": name, "layers": shape["num_hidden_layers"], "tokens": sum(seq_lengths)}
    for budget in args.budgets:
        cfg = Config()
        cfg.model.path, cfg.data.path = str(hf_dir), "unused"
        cfg.train.groups_per_step = cfg.train.groups_per_update = args.sequences // args.group
        cfg.train.responses_per_prompt = args.group
        cfg.train.max_tokens_per_microbatch = max(budget, max(seq_lengths))
        cfg.train.lr = 1e-6
        cfg.parallel.recompute = args.recompute
        cfg.algorithm.routing_replay = "off"  # synthetic samples carry no engine routing: the router routes
        trainer = model = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            model = build_model(load_hf_config(hf_dir), dtype=platform.default_dtype(), parallel=cfg.parallel)
            trainer = Policy(cfg, model=model)
            times = []
            for rep in range(args.reps + 1):  # the first update warms up (allocator, kernels)
                _sync()
                start = time.perf_counter()
                metrics = trainer.update_collective(groups, version=rep)
                _sync()
                if rep:
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            out.setdefault("out_of_memory_budgets", []).append(budget)
            trainer = model = None
            gc.collect()
            torch.cuda.empty_cache()
            continue
        step_s = statistics.median(times)
        out.update(
            budget=cfg.train.max_tokens_per_microbatch,
            recompute=args.recompute,
            step_s=step_s,
            tokens_per_s=out["tokens"] / step_s,
            attention_flops_fraction=attention / fwd,
            loss=metrics.get("loss/value"),
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            mfu=3 * fwd / step_s / peak if peak else None,
            mfu_with_prepass=4 * fwd / step_s / peak if peak else None,
        )
        break
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["qwen3-1.7b", "qwen3-8b"], choices=sorted(SHAPES))
    p.add_argument("--budgets", nargs="+", type=int, default=[32768, 16384, 8192], help="largest first")
    p.add_argument("--layers", type=int, default=0, help="override the depth (0 = the shape's default)")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the paper's response lengths by this")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--small", action="store_true", help="CPU flow check: tiny dense and MoE shapes, short sequences"
    )
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args()
    if args.small:
        args.models, args.budgets, args.sequences, args.group = ["small", "small-moe"], [256], 8, 4
        args.prompt, args.scale, args.reps = 8, 0.02, 1
    platform.init_distributed(seed=args.seed)
    torch.manual_seed(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results.append(bench_model(name, args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    platform.destroy_distributed()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
