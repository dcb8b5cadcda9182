"""Per-GPU memory ESTIMATE of the trainer's model states and activations and the engines' weights.

    python examples/memory_estimate.py                 # every example model with its default layouts
    python examples/memory_estimate.py qwen3-8b --tp 4 --pp 1
    python examples/memory_estimate.py qwen2.5-32b --tp 8 --pp 2 --dp 2 --distributed-optimizer \
        --tokens 4096 --sequence-parallel --recompute full

This is arithmetic, not a measurement. Parameter counts come from each model's published config
(dimensions below; the HF config.json of the model gives the same numbers) with the formula of a
Qwen/Llama dense decoder: embeddings (+ untied output layer) + per layer [q, k, v, o projections
(+ qkv bias), gate/up/down MLP, norms]. Model states per parameter, split over TP x PP
(`trainer/optimizer.py`): bf16 weights 2 B + fp32 main gradients 4 B (`grad_reduce_in_fp32`) + fp32
master weights 4 B + Adam moments 8 B = 18 B; with the distributed optimizer (`parallel.
distributed_optimizer`, ZeRO-1) the 12 B of master weights and moments are further split over DP.

Activations (`--tokens`, the micro-batch token budget `train.max_tokens_per_microbatch`): Korthikanti et
al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), bf16, per layer and token
h x (10 + 24 / TP) bytes, h x 34 / TP with sequence parallel, without the attention-score term (flash
attention keeps no s x s scores, so selective recompute of core attention saves about nothing more);
full recompute keeps only each layer's input (2 h, / TP with sequence parallel) plus one layer's full
set. 1F1B holds PP micro-batches in flight on the first stage, so it holds every layer's activations of
one micro-batch. The formula is for a 4h MLP; gated MLPs differ by some 10-20%. NOT included: the logits
of the log-prob computation (chunked, `algorithms.vocab_parallel_logprobs`), CUDA context,
fragmentation. Engines hold bf16 weights (2 B / parameter / engine TP) plus their KV cache (SGLang's
--mem-fraction-static decides it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024**3
TRAINER_BYTES_PER_PARAM = 2 + 4 + 4 + 8  # bf16 weight, fp32 grad, fp32 master, Adam m and v
SHARDED_BYTES_PER_PARAM = 4 + 8  # what the distributed optimizer splits over DP: fp32 master, Adam m and v
ENGINE_BYTES_PER_PARAM = 2  # bf16 weights


@dataclass(frozen=True)
class Dims:
    hf_id: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    def parameters(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        if self.qkv_bias:
            attention += q + 2 * kv
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        layer = attention + 3 * self.hidden * self.intermediate + norms
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embeddings + self.hidden


MODELS = {
    "qwen3-1.7b": Dims("Qwen/Qwen3-1.7B-Base", 151936, 2048, 28, 6144, 16, 8, 128, True, False, True),
    "qwen3-8b": Dims("Qwen/Qwen3-8B-Base", 151936, 4096, 36, 12288, 32, 8, 128, False, False, True),
    "qwen2.5-math-7b": Dims("Qwen/Qwen2.5-Math-7B", 152064, 3584, 28, 18944, 28, 4, 128, False, True, False),
    "qwen2.5-32b": Dims("Qwen/Qwen2.5-32B", 152064, 5120, 64, 27648, 40, 8, 128, False, True, False),
    "qwen3-32b": Dims("Qwen/Qwen3-32B", 151936, 5120, 64, 25600, 64, 8, 128, False, False, True),
}

# (trainer TP, trainer PP, engine TP, trainer DP, distributed optimizer) used by the example READMEs.
LAYOUTS = {
    "qwen3-1.7b": (1, 1, 1, 4, False),
    "qwen3-8b": (4, 1, 1, 2, True),
    "qwen2.5-math-7b": (4, 1, 1, 2, True),
    "qwen2.5-32b": (8, 2, 4, 2, True),
    "qwen3-32b": (8, 2, 4, 2, True),
}
# the recipes' train.max_tokens_per_microbatch
TOKENS = {
    "qwen3-1.7b": 16384,
    "qwen3-8b": 8192,
    "qwen2.5-math-7b": 8192,
    "qwen2.5-32b": 4096,
    "qwen3-32b": 4096,
}


def activation_bytes(d: Dims, tokens: int, tp: int, sequence_parallel: bool, recompute: str) -> float:
    """Activations of one micro-batch of `tokens` tokens through every layer (see the module docstring)."""
    full = d.hidden * (34 / tp if sequence_parallel else 10 + 24 / tp)  # per layer and token
    if recompute == "full":
        kept = 2 * d.hidden / (tp if sequence_parallel else 1)
        return tokens * (d.layers * kept + full)
    return tokens * d.layers * full


def estimate(
    name: str,
    tp: int,
    pp: int,
    engine_tp: int,
    *,
    dp: int = 1,
    distributed_optimizer: bool = False,
    tokens: int = 0,
    sequence_parallel: bool = False,
    recompute: str = "none",
) -> dict[str, float]:
    d = MODELS[name]
    params = d.parameters()
    per_param = TRAINER_BYTES_PER_PARAM
    if distributed_optimizer:
        per_param -= SHARDED_BYTES_PER_PARAM * (1 - 1 / dp)
    return {
        "params_b": params / 1e9,
        "trainer_gib_per_gpu": params * per_param / (tp * pp) / GIB,
        "activations_gib_per_gpu": activation_bytes(d, tokens, tp, sequence_parallel, recompute) / GIB,
        "engine_weights_gib_per_gpu": params * ENGINE_BYTES_PER_PARAM / engine_tp / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", choices=sorted(MODELS), help="one model (default: all)")
    parser.add_argument("--tp", type=int, help="trainer tensor parallel")
    parser.add_argument("--pp", type=int, help="trainer pipeline parallel")
    parser.add_argument("--dp", type=int, help="trainer data parallel")
    parser.add_argument("--engine-tp", type=int, help="GPUs per SGLang server")
    parser.add_argument(
        "--distributed-optimizer", action=argparse.BooleanOptionalAction, help="ZeRO-1 over DP"
    )
    parser.add_argument("--tokens", type=int, help="micro-batch token budget (activations)")
    parser.add_argument("--sequence-parallel", action="store_true", help="parallel.sequence_parallel")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    args = parser.parse_args()
    print(
        "| model | parameters | trainer TP x PP x DP | dist. optimizer | model states / trainer GPU "
        "| activations / trainer GPU | engine TP | engine weights / GPU |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in [args.model] if args.model else MODELS:
        tp, pp, etp, dp, zero = LAYOUTS[name]
        tp, pp, etp, dp = args.tp or tp, args.pp or pp, args.engine_tp or etp, args.dp or dp
        zero = zero if args.distributed_optimizer is None else args.distributed_optimizer
        tokens = args.tokens or TOKENS[name]
        sp = args.sequence_parallel and tp > 1
        e = estimate(
            name, tp, pp, etp, dp=dp, distributed_optimizer=zero, tokens=tokens,
            sequence_parallel=sp, recompute=args.recompute,
        )  # fmt: skip
        how = (
            f"{tokens} tokens"
            + (", SP" if sp else "")
            + (f", {args.recompute} recompute" if args.recompute != "none" else "")
        )
        print(
            f"| {MODELS[name].hf_id} | {e['params_b']:.2f} B | {tp} x {pp} x {dp} | {'yes' if zero else 'no'} "
            f"| {e['trainer_gib_per_gpu']:.1f} GiB | {e['activations_gib_per_gpu']:.1f} GiB ({how}) "
            f"| {etp} | {e['engine_weights_gib_per_gpu']:.1f} GiB |"
        )


if __name__ == "__main__":
    main()
