"""Trainer tokens/s with packed token-budget micro-batches vs right-padded ones, on one long-tailed mini-batch.

    OMP_NUM_THREADS=1 python -m bench.packing            # CPU default: lengths scaled by 1/8
    OMP_NUM_THREADS=1 python -m bench.packing --scale 0.05 --sequences 16 --reps 1   # quick

The mini-batch: `--sequences` responses whose lengths follow a log-normal like the paper's (median 600,
sigma 0.8, capped at 2560, all x `--scale`), behind prompts of `--prompt` tokens, with rewards, advantages
and behaviour log-probs, as the trainer consumes them. Both variants run the real `Policy.update` (the
m2po loss with its global M2 pre-pass, Megatron's schedule, the optimizer step) on the same model:

- padded: `micro_batch_size` sequences per micro-batch, every one right-padded to the mini-batch's longest
  (the trainer's fixed shape);
- packed: `train.max_tokens_per_microbatch` = micro_batch_size x that longest (the same peak shape), the
  sequences balanced over micro-batches by tokens and concatenated without padding (THD, cu_seqlens).

tokens/s counts real tokens (prompt + response) per second of `update`; the ratio packed / padded is from
one run, variants interleaved so machine noise hits both alike, median of `--reps`.
"""

from __future__ import annotations

import argparse
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

from megatron_m2po import platform  # noqa: E402
from megatron_m2po.config import Config  # noqa: E402
from megatron_m2po.models.tiny import make_tiny_model  # noqa: E402
from megatron_m2po.types import Group, Sample  # noqa: E402


def response_lengths(n: int, scale: float, seed: int) -> list[int]:
    """Log-normal lengths, median 600 and sigma 0.8 (a long tail: mean ~ 830), capped at 2560, x scale."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.log(torch.tensor(600.0)) + 0.8 * torch.randn(n, generator=g)).clamp(max=2560)
    return [max(1, round(float(x) * scale)) for x in raw]


def make_groups(lengths: list[int], prompt: int, group_size: int, vocab: int, seed: int) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    groups = []
    for p in range(len(lengths) // group_size):
        prompt_ids = torch.randint(3, vocab, (prompt,), generator=g).tolist()
        samples = []
        for j in range(group_size):
            n = lengths[p * group_size + j]
            resp = torch.randint(3, vocab, (n,), generator=g).tolist()
            blp = (-1.0 - torch.rand(n, generator=g) * 3).tolist()
            samples.append(Sample(f"p{p}", j, prompt_ids, resp, blp, [0] * n, "stop", reward=float(j % 2)))
        groups.append(Group(f"p{p}", prompt_ids, samples))
    return groups


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    lengths = response_lengths(args.sequences, args.scale, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_model(
            "qwen3",
            Path(tmp) / "model",
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 256),
            head_dim=64,
            max_position_embeddings=4096,
        )
        cfg = Config()
        cfg.model.path, cfg.data.path = str(hf_dir), "unused"
        cfg.train.groups_per_step = cfg.train.groups_per_update = args.sequences // args.group
        cfg.train.responses_per_prompt = args.group
        cfg.train.micro_batch_size = args.micro_batch_size
        cfg.train.lr = 1e-5
        platform.init_distributed(seed=args.seed)
        from megatron_m2po.trainer.policy import Policy

        trainer = Policy(cfg)
        groups = make_groups(lengths, args.prompt, args.group, trainer.hf_config.vocab_size, args.seed)
        longest = args.prompt + max(lengths)
        budget = args.micro_batch_size * longest
        real_tokens = sum(args.prompt + n for n in lengths)
        times: dict[str, list[float]] = {"padded": [], "packed": []}
        for rep in range(args.reps + 1):  # the first round warms up both
            for variant in ("padded", "packed"):
                cfg.train.max_tokens_per_microbatch = budget if variant == "packed" else 0
                start = time.perf_counter()
                trainer.update_collective(groups, version=rep)
                if rep:
                    times[variant].append(time.perf_counter() - start)
        platform.destroy_distributed()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "sequences": args.sequences,
        "response_length_median": statistics.median(lengths),
        "response_length_max": max(lengths),
        "real_tokens": real_tokens,
        "padded_tokens": args.sequences * longest,
        "budget": budget,
        "padded_s": med["padded"],
        "packed_s": med["packed"],
        "padded_tokens_per_s": real_tokens / med["padded"],
        "packed_tokens_per_s": real_tokens / med["packed"],
        "ratio": med["padded"] / med["packed"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=64, help="sequences in the mini-batch")
    p.add_argument("--group", type=int, default=8, help="responses per prompt")
    p.add_argument("--scale", type=float, default=0.125, help="multiply the paper's lengths by this (CPU)")
    p.add_argument("--prompt", type=int, default=24, help="prompt tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per padded micro-batch")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result, indent=1))
    print(
        f"padded {result['padded_tokens_per_s']:.0f} tok/s, packed {result['packed_tokens_per_s']:.0f} tok/s: "
        f"{result['ratio']:.2f}x ({result['real_tokens']} real of {result['padded_tokens']} padded tokens)"
    )


if __name__ == "__main__":
    main()
