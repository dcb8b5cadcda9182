"""Loss cost relative to grpo on one batch, and the log-prob path's peak memory relative to log_softmax.

    OMP_NUM_THREADS=1 python -m bench.losses                 # 64 prompts x 8 responses x 2048 tokens
    OMP_NUM_THREADS=1 python -m bench.losses --tokens 256    # quick

Part 1: forward + backward of every loss on the same [512, 2048] fp32 batch (heavy-tailed log-ratios as
with stale data), median and min of --reps runs, interleaved round-robin so machine noise hits all losses alike;
ratios are against grpo measured in the same run. m2po runs as the trainer calls it (global scope,
threshold precomputed once per mini-batch); the threshold pre-pass and per_microbatch scope are listed too.
Part 2: peak resident memory above the inputs, forward + backward, of `vocab_parallel_logprobs` vs
`log_softmax(logits.float()).gather()` on bf16 logits [--mem-tokens, --vocab], each in a fresh subprocess
(peak RSS via /proc/self/status VmHWM after resetting it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench/ holds scripts named like stdlib modules (queue.py): keep it off the import path, put the repo on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_m2po.algorithms import compute_m2_threshold, get_loss, vocab_parallel_logprobs  # noqa: E402


def make_batch(sequences: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(sequences, tokens, generator=g) * 3
    small = torch.randn(sequences, tokens, generator=g) * 0.05
    spikes = (torch.rand(sequences, tokens, generator=g) < 0.02) * torch.randn(sequences, tokens, generator=g)
    blp = lp - small - spikes
    adv = torch.randn(sequences, 1, generator=g).expand(sequences, tokens).contiguous()
    lengths = torch.randint(tokens // 4, tokens + 1, (sequences, 1), generator=g)
    mask = torch.arange(tokens)[None] < lengths
    return lp, blp, adv, mask


def time_losses(args) -> list[tuple[str, float]]:
    lp, blp, adv, mask = (t.to(args.device) for t in make_batch(args.prompts * args.responses, args.tokens))
    prox = (lp + blp) / 2
    m2po = get_loss("m2po")
    budget = m2po.hyperparameters["m2_budget"]
    theta = compute_m2_threshold(lp, blp, adv, mask, m2_budget=budget)
    cases = {
        "grpo": (get_loss("grpo"), {}),
        "m2po (global, threshold given)": (m2po, {"m2_threshold": theta}),
        "m2po (per_microbatch)": (get_loss("m2po", m2_scope="per_microbatch"), {}),
        "m2po_clip": (get_loss("m2po_clip"), {}),
        "grpo_noclip": (get_loss("grpo_noclip"), {}),
        "tis": (get_loss("tis"), {}),
        "decoupled_ppo": (get_loss("decoupled_ppo"), {"proximal_logprobs": prox}),
        "gspo": (get_loss("gspo"), {}),
        "cispo": (get_loss("cispo"), {}),
        "topr": (get_loss("topr"), {}),
        "on_policy": (get_loss("on_policy"), {}),
    }

    def one(name):
        loss, kw = cases[name]
        x = lp.clone().requires_grad_()
        sync()
        start = time.perf_counter()
        value, _ = loss(x, blp, adv, mask, **kw)
        value.backward()
        sync()
        return time.perf_counter() - start

    def prepass():
        sync()
        start = time.perf_counter()
        compute_m2_threshold(lp, blp, adv, mask, m2_budget=budget)
        sync()
        return time.perf_counter() - start

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    timings = {name: [] for name in [*cases, "m2 threshold pre-pass (once per mini-batch)"]}
    for name in cases:  # warm-up
        one(name)
    for _ in range(args.reps):
        for name in cases:
            timings[name].append(one(name))
        timings["m2 threshold pre-pass (once per mini-batch)"].append(prepass())
    return [(name, statistics.median(t), min(t)) for name, t in timings.items()]


def _peak_rss_child(path: str, tokens: int, vocab: int) -> None:
    """Runs in a subprocess: prints the extra peak RSS (bytes) of one forward + backward."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=torch.bfloat16)
    for start in range(0, tokens, 64):  # fill without a full-size fp32 temporary
        logits[start : start + 64] = torch.randn(min(64, tokens - start), vocab, generator=g)
    logits.requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = rss("VmRSS:")
    start = time.perf_counter()
    if path == "log_softmax":
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        lp = vocab_parallel_logprobs(logits, targets)
    forward_peak = rss("VmHWM:") - base
    lp.sum().backward()
    seconds = time.perf_counter() - start
    peak = rss("VmHWM:") - base
    print(
        json.dumps(
            {"forward": forward_peak, "total": peak, "grad": logits.grad.numel() * 2, "seconds": seconds}
        )
    )


def measure_cuda_memory(args) -> dict[str, dict[str, int]]:
    """Peak allocated CUDA memory above the inputs (torch.cuda.max_memory_allocated)."""
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(args.mem_tokens, args.vocab, device="cuda", generator=g, dtype=torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.mem_tokens,), device="cuda", generator=g)
    for path in ("log_softmax", "vocab_parallel_logprobs") * 2:  # second round is timed warm
        x = logits.detach().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        if path == "log_softmax":
            lp = torch.log_softmax(x.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        else:
            lp = vocab_parallel_logprobs(x, targets)
        forward = torch.cuda.max_memory_allocated() - base
        lp.sum().backward()
        torch.cuda.synchronize()
        out[path] = {
            "forward": forward,
            "total": torch.cuda.max_memory_allocated() - base,
            "grad": x.grad.numel() * 2,
            "seconds": time.perf_counter() - start,
        }
        del x, lp
    return out


def measure_memory(args) -> dict[str, dict[str, int]]:
    if args.device == "cuda":
        return measure_cuda_memory(args)
    out = {}
    for path in ("log_softmax", "vocab_parallel_logprobs"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                path,
                "--mem-tokens",
                str(args.mem_tokens),
                "--vocab",
                str(args.vocab),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        out[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="response length (padded)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2.5/Qwen3 vocabulary")
    parser.add_argument("--mem-tokens", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        _peak_rss_child(args.child, args.mem_tokens, args.vocab)
        return 0

    n = args.prompts * args.responses
    print(
        f"## losses: {n} responses x {args.tokens} tokens = {n * args.tokens / 1e6:.2f}M token slots, fp32, {args.device}"
    )
    results = time_losses(args)
    base_median, base_min = next((med, low) for name, med, low in results if name == "grpo")
    print("| loss | median fwd+bwd (ms) | vs grpo | min (ms) | vs grpo |\n|---|---:|---:|---:|---:|")
    for name, med, low in results:
        print(
            f"| {name} | {med * 1e3:.1f} | {med / base_median:.2f}x | {low * 1e3:.1f} | {low / base_min:.2f}x |"
        )

    mem = measure_memory(args)
    gib = 2**30
    full, ours = mem["log_softmax"], mem["vocab_parallel_logprobs"]
    print(
        f"\n## log-prob path: bf16 logits [{args.mem_tokens}, {args.vocab}] ({full['grad'] / gib:.2f} GiB), peak memory above inputs ({'max_memory_allocated' if args.device == 'cuda' else 'RSS'})"
    )
    print(
        "| path | forward peak (GiB) | forward + backward peak (GiB) | fwd+bwd time (s) |\n|---|---:|---:|---:|"
    )
    for name, m in mem.items():
        print(f"| {name} | {m['forward'] / gib:.2f} | {m['total'] / gib:.2f} | {m['seconds']:.3f} |")
    print(
        f"| ratio (ours / log_softmax) | {ours['forward'] / full['forward']:.3f} | {ours['total'] / full['total']:.3f} | {ours['seconds'] / full['seconds']:.2f}x |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
