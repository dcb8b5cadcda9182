"""Per-GPU memory ESTIMATE of the trainer's model states and the engines' weights, from parameter counts.

    python examples/memory_estimate.py                 # every example model with its default layouts
    python examples/memory_estimate.py qwen3-8b --tp 4 --pp 1

This is arithmetic, not a measurement. Parameter counts come from each model's published config
(dimensions below; the HF config.json of the model gives the same numbers) with the formula of a
Qwen/Llama dense decoder: embeddings (+ untied output layer) + per layer [q, k, v, o projections
(+ qkv bias), gate/up/down MLP, norms]. The trainer keeps, per parameter and split over TP x PP
(the non-distributed Megatron optimizer, as `trainer/optimizer.py` builds it):
bf16 weights 2 B + fp32 main gradients 4 B (`grad_reduce_in_fp32`) + fp32 master weights 4 B
+ Adam moments 8 B = 18 B. NOT included: activations (they grow with micro_batch_size x sequence
length; keep >= 15 GB free and check with a 2-step run), the logits of the log-prob computation
(chunked, `algorithms.vocab_parallel_logprobs`), CUDA context and fragmentation. Engines hold bf16
weights (2 B / parameter / engine TP) plus their KV cache (SGLang's --mem-fraction-static decides it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024**3
TRAINER_BYTES_PER_PARAM = 2 + 4 + 4 + 8  # bf16 weight, fp32 grad, fp32 master, Adam m and v
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

# (trainer TP, trainer PP, engine TP) used by the example recipes.
LAYOUTS = {
    "qwen3-1.7b": (1, 1, 1),
    "qwen3-8b": (4, 1, 1),
    "qwen2.5-math-7b": (4, 1, 1),
    "qwen2.5-32b": (8, 2, 4),
    "qwen3-32b": (8, 2, 4),
}


def estimate(name: str, tp: int, pp: int, engine_tp: int) -> dict[str, float]:
    params = MODELS[name].parameters()
    return {
        "params_b": params / 1e9,
        "trainer_gib_per_gpu": params * TRAINER_BYTES_PER_PARAM / (tp * pp) / GIB,
        "engine_weights_gib_per_gpu": params * ENGINE_BYTES_PER_PARAM / engine_tp / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", choices=sorted(MODELS), help="one model (default: all)")
    parser.add_argument("--tp", type=int, help="trainer tensor parallel")
    parser.add_argument("--pp", type=int, help="trainer pipeline parallel")
    parser.add_argument("--engine-tp", type=int, help="GPUs per SGLang server")
    args = parser.parse_args()
    print(
        "| model | parameters | trainer TP x PP | model states / trainer GPU | engine TP | engine weights / GPU |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in [args.model] if args.model else MODELS:
        tp, pp, etp = LAYOUTS[name]
        tp, pp, etp = args.tp or tp, args.pp or pp, args.engine_tp or etp
        e = estimate(name, tp, pp, etp)
        print(
            f"| {MODELS[name].hf_id} | {e['params_b']:.2f} B | {tp} x {pp} | {e['trainer_gib_per_gpu']:.1f} GiB "
            f"| {etp} | {e['engine_weights_gib_per_gpu']:.1f} GiB |"
        )


if __name__ == "__main__":
    main()
