"""Per-GPU memory ESTIMATE of the trainer's model states and activations and the engines' weights.

    python examples/memory_estimate.py                 # every example model with its default layouts
    python examples/memory_estimate.py qwen3-8b --tp 4 --pp 1
    python examples/memory_estimate.py qwen2.5-32b --tp 8 --pp 2 --dp 2 --distributed-optimizer \
        --tokens 4096 --sequence-parallel --recompute full
    python examples/memory_estimate.py qwen3-30b-a3b --tp 2 --pp 1 --ep 16 --etp 1 --dp 8 \
        --distributed-optimizer --sequence-parallel

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

Mixture-of-experts models (Qwen3-MoE: every layer's MLP is `experts` SwiGLU experts of width
`moe_intermediate`, `top_k` of them per token, and a router of hidden x experts): the expert weights are
split over expert-tensor x expert x pipeline ranks (ETP x EP x PP), everything else (attention, norms,
router, embeddings) over TP x PP as for a dense model. The distributed optimizer splits the 12 B of each
over its own data-parallel group: the dense part over DP = world / (TP x PP), the experts over the
expert-data-parallel group, world / (ETP x EP x PP). Activations of an MoE layer: the attention and norm
terms of the formula above (7 h + 8 h / TP per token, 15 h / TP with sequence parallel) plus, per token on
this rank, the router's fp32 logits and probabilities (8 x experts bytes) and, for each of the top_k
experts it goes to, its bf16 input copy (2 h) and SwiGLU intermediates (gate and up outputs, activation,
product: 8 x moe_intermediate / ETP bytes). Balanced routing is assumed (EP spreads experts, not tokens: a
rank computes as many token-expert pairs as its own tokens send out); a skewed router puts more on some
ranks. Engines: SGLang's expert parallelism (`--ep`) splits expert weights like its TP splits the rest.

Context parallelism (`--cp`, `parallel.context`) cuts every sequence over CP ranks: a rank's activations
are those of tokens / CP tokens, and the distributed optimizer shards the dense part over DP x CP
(Megatron's data-parallel group with context parallelism); the expert grid does not involve CP.
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
    experts: int = 0  # MoE: experts per layer (0: dense); every layer sparse, as in Qwen3-MoE
    top_k: int = 0
    moe_intermediate: int = 0

    def expert_parameters(self) -> int:
        """The experts' weights (split over ETP x EP x PP); the router is not one of them."""
        return self.layers * self.experts * 3 * self.hidden * self.moe_intermediate

    def parameters(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        if self.qkv_bias:
            attention += q + 2 * kv
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        mlp = self.hidden * self.experts if self.experts else 3 * self.hidden * self.intermediate
        layer = attention + mlp + norms
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embeddings + self.hidden + self.expert_parameters()

    def active_parameters(self) -> int:
        """Parameters one token passes through (top_k of the experts)."""
        if not self.experts:
            return self.parameters()
        return self.parameters() - self.expert_parameters() * (self.experts - self.top_k) // self.experts


MODELS = {
    "qwen3-1.7b": Dims("Qwen/Qwen3-1.7B-Base", 151936, 2048, 28, 6144, 16, 8, 128, True, False, True),
    "qwen3-8b": Dims("Qwen/Qwen3-8B-Base", 151936, 4096, 36, 12288, 32, 8, 128, False, False, True),
    "qwen2.5-math-7b": Dims("Qwen/Qwen2.5-Math-7B", 152064, 3584, 28, 18944, 28, 4, 128, False, True, False),
    "qwen2.5-32b": Dims("Qwen/Qwen2.5-32B", 152064, 5120, 64, 27648, 40, 8, 128, False, True, False),
    "qwen3-32b": Dims("Qwen/Qwen3-32B", 151936, 5120, 64, 25600, 64, 8, 128, False, False, True),
    "qwen3-30b-a3b": Dims(
        "Qwen/Qwen3-30B-A3B-Base", 151936, 2048, 48, 6144, 32, 4, 128, False, False, True, 128, 8, 768
    ),
    "qwen3-235b-a22b": Dims(
        "Qwen/Qwen3-235B-A22B", 151936, 4096, 94, 12288, 64, 4, 128, False, False, True, 128, 8, 1536
    ),
}

# (trainer TP, trainer PP, engine TP, trainer DP, distributed optimizer) used by the example READMEs.
LAYOUTS = {
    "qwen3-1.7b": (1, 1, 1, 4, False),
    "qwen3-8b": (4, 1, 1, 2, True),
    "qwen2.5-math-7b": (4, 1, 1, 2, True),
    "qwen2.5-32b": (8, 2, 4, 2, True),
    "qwen3-32b": (8, 2, 4, 2, True),
    "qwen3-30b-a3b": (2, 1, 8, 8, True),
    "qwen3-235b-a22b": (4, 2, 8, 16, True),
}
# MoE layouts of the example READMEs: (trainer EP, trainer ETP)
EXPERT_LAYOUTS = {"qwen3-30b-a3b": (16, 1), "qwen3-235b-a22b": (64, 1)}
# the recipes' train.max_tokens_per_microbatch
TOKENS = {
    "qwen3-1.7b": 16384,
    "qwen3-8b": 8192,
    "qwen2.5-math-7b": 8192,
    "qwen2.5-32b": 4096,
    "qwen3-32b": 4096,
    "qwen3-30b-a3b": 10240,
    "qwen3-235b-a22b": 10240,
}


def layer_bytes_per_token(d: Dims, tp: int, sequence_parallel: bool, etp: int) -> float:
    """One layer's activations per token of the micro-batch (see the module docstring)."""
    if not d.experts:
        return d.hidden * (34 / tp if sequence_parallel else 10 + 24 / tp)
    attention = d.hidden * (15 / tp if sequence_parallel else 7 + 8 / tp)
    local = 1 / tp if sequence_parallel else 1  # the share of the micro-batch's tokens this rank routes
    experts = d.top_k * (2 * d.hidden + 8 * d.moe_intermediate / etp)
    return attention + local * (8 * d.experts + experts)


def activation_bytes(
    d: Dims, tokens: int, tp: int, sequence_parallel: bool, recompute: str, etp: int | None = None
) -> float:
    """Activations of one micro-batch of `tokens` tokens through every layer (see the module docstring)."""
    full = layer_bytes_per_token(d, tp, sequence_parallel, tp if etp is None else etp)
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
    ep: int = 1,
    etp: int | None = None,
    cp: int = 1,
) -> dict[str, float]:
    """`dp` is the trainer's data-parallel size (world = TP x PP x CP x DP); `ep` / `etp` the expert-parallel and
    expert-tensor-parallel sizes of an MoE model (`etp` unset: TP, Megatron's default); `cp` the
    context-parallel size (`parallel.context`: each rank holds 1 / CP of a sequence's tokens, and the
    distributed optimizer shards the dense part over DP x CP). The engine's expert parallelism splits expert
    weights like its TP, so `engine_tp` covers both."""
    d = MODELS[name]
    etp = tp if etp is None else etp
    world = tp * pp * cp * dp
    if world % (etp * ep * pp):
        raise ValueError(f"{name}: ETP x EP x PP = {etp} x {ep} x {pp} does not divide the world {world}")
    expert_dp = world // (etp * ep * pp)

    def per_param(group: int) -> float:
        sharded = SHARDED_BYTES_PER_PARAM * (1 - 1 / group) if distributed_optimizer else 0
        return TRAINER_BYTES_PER_PARAM - sharded

    params, expert_params = d.parameters(), d.expert_parameters()
    states = (params - expert_params) * per_param(dp * cp) / (tp * pp)
    states += expert_params * per_param(expert_dp) / (etp * ep * pp)
    return {
        "params_b": params / 1e9,
        "active_params_b": d.active_parameters() / 1e9,
        "trainer_gib_per_gpu": states / GIB,
        "activations_gib_per_gpu": activation_bytes(d, tokens / cp, tp, sequence_parallel, recompute, etp)
        / GIB,
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
    parser.add_argument("--ep", type=int, help="MoE: trainer expert parallel")
    parser.add_argument("--etp", type=int, help="MoE: trainer expert tensor parallel (default: --tp)")
    parser.add_argument("--cp", type=int, default=1, help="trainer context parallel (parallel.context)")
    parser.add_argument(
        "--distributed-optimizer", action=argparse.BooleanOptionalAction, help="ZeRO-1 over DP"
    )
    parser.add_argument("--tokens", type=int, help="micro-batch token budget (activations)")
    parser.add_argument("--sequence-parallel", action="store_true", help="parallel.sequence_parallel")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    args = parser.parse_args()
    print(
        "| model | parameters (active) | trainer TP x PP x DP | EP (ETP) | dist. optimizer "
        "| model states / trainer GPU | activations / trainer GPU | engine TP | engine weights / GPU |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in [args.model] if args.model else MODELS:
        tp, pp, engine_tp, dp, zero = LAYOUTS[name]
        tp, pp, engine_tp, dp = args.tp or tp, args.pp or pp, args.engine_tp or engine_tp, args.dp or dp
        ep, etp = EXPERT_LAYOUTS.get(name, (1, None))
        ep, etp = args.ep or ep, args.etp or etp
        zero = zero if args.distributed_optimizer is None else args.distributed_optimizer
        tokens = args.tokens or TOKENS[name]
        sp = args.sequence_parallel and tp > 1
        e = estimate(
            name, tp, pp, engine_tp, dp=dp, distributed_optimizer=zero, tokens=tokens,
            sequence_parallel=sp, recompute=args.recompute, ep=ep, etp=etp, cp=args.cp,
        )  # fmt: skip
        how = (
            f"{tokens} tokens"
            + (", SP" if sp else "")
            + (f", {args.recompute} recompute" if args.recompute != "none" else "")
            + (f", CP {args.cp}" if args.cp > 1 else "")
        )
        experts = f"{ep} ({etp or tp})" if MODELS[name].experts else "-"
        print(
            f"| {MODELS[name].hf_id} | {e['params_b']:.2f} B ({e['active_params_b']:.2f} B) | {tp} x {pp} x {dp} "
            f"| {experts} | {'yes' if zero else 'no'} "
            f"| {e['trainer_gib_per_gpu']:.1f} GiB | {e['activations_gib_per_gpu']:.1f} GiB ({how}) "
            f"| {engine_tp} | {e['engine_weights_gib_per_gpu']:.1f} GiB |"
        )


if __name__ == "__main__":
    main()
