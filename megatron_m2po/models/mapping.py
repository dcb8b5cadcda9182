"""HF <-> Megatron weight names, one table per architecture family: the single source of truth.

A `WeightRule` says which HF tensor(s) make one Megatron parameter, how that parameter is split over
tensor-parallel ranks, and whether several HF tensors are fused into it. The offline converters, the
HF-dir loader and the online weight sync (`iter_hf_tensors`) all read these tables; nothing else in
the project knows a weight name.

Megatron layouts (verified against megatron-core 0.16):
- `linear_qkv` (GQA): per query group g, rows [q heads of g (heads_per_group*head_dim), k_g (head_dim),
  v_g (head_dim)], stacked over groups; TP splits along groups, so a rank holds whole groups.
- `linear_fc1`: each TP shard is cat(gate_shard, up_shard).
- Local spec norms are `input_layernorm` / `pre_mlp_layernorm`; the Transformer Engine spec fuses them
  into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight` (`WeightRule.te_megatron`).
- Mixture-of-experts layers (Qwen3-MoE): `mlp.router.weight` [experts, hidden] is the HF `mlp.gate.weight`;
  expert e's `linear_fc1` is cat(gate_e, up_e) and `linear_fc2` its down projection, one tensor per expert
  as Hub checkpoints and the engines name them (`mlp.experts.{e}.gate_proj.weight`, ...). Megatron names
  an expert by its index on this expert-parallel rank: `experts.local_experts.{i}.linear_fc1.weight`
  (sequential experts, CPU) or `experts.linear_fc1.weight{i}` (grouped GEMM, GPU); the expert's global index
  is ep_rank * experts_per_rank + i. The pre-MLP norm stays a separate `pre_mlp_layernorm` under both specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Split = Literal["column", "row", "vocab", "replicated"]
Fuse = Literal["qkv", "gate_up"]


@dataclass(frozen=True)
class WeightRule:
    megatron: str  # name inside GPTModel; "{layer}" is the stage-local layer index
    hf: tuple[str, ...]  # HF names; "{layer}" is the global layer index
    split: Split
    fuse: Fuse | None = None
    te_megatron: str | None = None  # the name under the Transformer Engine layer spec, when it differs
    checkpoint: str | None = None  # the dist-checkpoint key, when it is not the layer-stacked megatron name

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron

    @property
    def per_expert(self) -> bool:
        """One tensor per expert: "{expert}" is the rank-local index in `megatron`, the global one in `hf`."""
        return "{expert}" in self.megatron


_EMBED = WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
_FINAL_NORM = WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated")
_LM_HEAD = WeightRule("output_layer.weight", ("lm_head.weight",), "vocab")
_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
_DECODER_LAYER = (
    WeightRule(
        _L + "input_layernorm.weight",
        (_H + "input_layernorm.weight",),
        "replicated",
        te_megatron=_L + "self_attention.linear_qkv.layer_norm_weight",
    ),
    WeightRule(
        _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        "column",
        fuse="qkv",
    ),
    WeightRule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "row"),
    WeightRule(
        _L + "pre_mlp_layernorm.weight",
        (_H + "post_attention_layernorm.weight",),
        "replicated",
        te_megatron=_L + "mlp.linear_fc1.layer_norm_weight",
    ),
    WeightRule(
        _L + "mlp.linear_fc1.weight",
        (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        "column",
        fuse="gate_up",
    ),
    WeightRule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "row"),
)
_QKV_BIAS = WeightRule(
    _L + "self_attention.linear_qkv.bias",
    (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
    "column",
    fuse="qkv",
)
_QK_NORMS = (
    WeightRule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), "replicated"),
    WeightRule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), "replicated"),
)

_E = _L + "mlp.experts."
_MOE_LAYER = (
    WeightRule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), "replicated"),
    WeightRule(_L + "mlp.router.weight", (_H + "mlp.gate.weight",), "replicated"),
    WeightRule(
        _E + "local_experts.{expert}.linear_fc1.weight",
        (_H + "mlp.experts.{expert}.gate_proj.weight", _H + "mlp.experts.{expert}.up_proj.weight"),
        "column",
        fuse="gate_up",
        te_megatron=_E + "linear_fc1.weight{expert}",
        checkpoint="decoder.layers.mlp.experts.experts.linear_fc1.weight",
    ),
    WeightRule(
        _E + "local_experts.{expert}.linear_fc2.weight",
        (_H + "mlp.experts.{expert}.down_proj.weight",),
        "row",
        te_megatron=_E + "linear_fc2.weight{expert}",
        checkpoint="decoder.layers.mlp.experts.experts.linear_fc2.weight",
    ),
)
_QWEN3_ATTENTION = _DECODER_LAYER[:2] + _QK_NORMS + _DECODER_LAYER[2:3]

# One table per family. Order = HF order within a layer (the order iter_hf_tensors yields).
LAYER_RULES: dict[str, tuple[WeightRule, ...]] = {
    "LlamaForCausalLM": _DECODER_LAYER,
    "Qwen2ForCausalLM": _DECODER_LAYER[:2] + (_QKV_BIAS,) + _DECODER_LAYER[2:],
    "Qwen3ForCausalLM": _QWEN3_ATTENTION + _DECODER_LAYER[3:],
    "Qwen3MoeForCausalLM": _QWEN3_ATTENTION + _MOE_LAYER,
}
SUPPORTED_ARCHITECTURES = tuple(LAYER_RULES)
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)


@dataclass(frozen=True)
class Layout:
    """The shape facts the split/fuse rules need, read once from the HF config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, hf_config) -> Layout:
        head_dim = (
            getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        )
        return cls(hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim)


def architecture(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if len(archs) != 1 or archs[0] not in LAYER_RULES:
        raise ValueError(
            f"unsupported architecture {archs!r} in config.json; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return archs[0]


def global_rules(hf_config) -> tuple[WeightRule, ...]:
    """Non-layer rules for this config (the lm head exists only when embeddings are untied)."""
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    return (_EMBED, _FINAL_NORM) if tied else (_EMBED, _FINAL_NORM, _LM_HEAD)


def layer_rules(hf_config) -> tuple[WeightRule, ...]:
    return LAYER_RULES[architecture(hf_config)]


def tied_output_rule() -> WeightRule:
    """With tied embeddings and PP>1 the last stage has its own `output_layer.weight`, a copy of the embedding."""
    return WeightRule("output_layer.weight", _EMBED.hf, "vocab")


def num_experts(hf_config) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    return (
        int(getattr(hf_config, "num_experts", 0) or 0) if architecture(hf_config) in MOE_ARCHITECTURES else 0
    )


def rule_instances(rule: WeightRule, hf_config) -> range | tuple[None]:
    """The expert indices a rule stands for (every global expert), or (None,) for a rule without experts."""
    return range(num_experts(hf_config)) if rule.per_expert else (None,)


def local_experts(hf_config, ep_rank: int, ep_size: int) -> range:
    """Global indices of the experts an expert-parallel rank holds (Megatron: a contiguous block)."""
    per_rank = num_experts(hf_config) // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def hf_names(rule: WeightRule, layer: int | None = None, expert: int | None = None) -> list[str]:
    return [name.format(layer=layer, expert=expert) for name in rule.hf]


def megatron_name(
    rule: WeightRule,
    local_layer: int | None = None,
    *,
    transformer_engine: bool = False,
    local_expert: int | None = None,
) -> str:
    """The parameter name in this rank's GPTModel; `transformer_engine` picks the TE / grouped-GEMM name."""
    name = rule.te_megatron if transformer_engine and rule.te_megatron else rule.megatron
    return name.format(layer=local_layer, expert=local_expert)


# ------------------------------------------------------------------------------ split and fuse


def _split_dim(split: Split) -> int | None:
    return {"column": 0, "vocab": 0, "row": 1, "replicated": None}[split]


def hf_slices_for_rank(
    rule: WeightRule, layout: Layout, hf_shapes: list[tuple[int, ...]], tp_rank: int, tp_size: int
):
    """Row/column ranges of each HF tensor that this TP rank needs: a list of (dim, start, stop) or None (all).

    Lets the loader read only this rank's bytes from safetensors (`safe_open(...).get_slice`).
    """
    if rule.split == "replicated":
        return [None] * len(hf_shapes)
    if rule.fuse == "qkv":
        groups = layout.num_kv_heads // tp_size
        heads_per_group = layout.num_heads // layout.num_kv_heads
        q_rows = groups * heads_per_group * layout.head_dim
        kv_rows = groups * layout.head_dim
        return [(0, tp_rank * q_rows, (tp_rank + 1) * q_rows)] + [
            (0, tp_rank * kv_rows, (tp_rank + 1) * kv_rows)
        ] * 2
    dim = _split_dim(rule.split)
    out = []
    for shape in hf_shapes:
        size = shape[dim] // tp_size
        out.append((dim, tp_rank * size, (tp_rank + 1) * size))
    return out


def to_megatron_shard(
    rule: WeightRule, layout: Layout, hf_parts: list[torch.Tensor], tp_size: int
) -> torch.Tensor:
    """Build one rank's Megatron parameter from that rank's slices of the HF tensors (`hf_slices_for_rank`)."""
    if rule.fuse == "qkv":
        q, k, v = hf_parts
        groups = layout.num_kv_heads // tp_size
        tail = q.shape[1:]
        q = q.reshape(groups, -1, *tail)
        k = k.reshape(groups, layout.head_dim, *tail)
        v = v.reshape(groups, layout.head_dim, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)
    if rule.fuse == "gate_up":
        return torch.cat(hf_parts, dim=0)
    (part,) = hf_parts
    return part


def to_hf_tensors(rule: WeightRule, layout: Layout, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full HF tensors from the Megatron shards of every TP rank (in rank order)."""
    tp_size = len(shards)
    if rule.split == "replicated":
        return [shards[0]]
    if rule.fuse == "qkv":
        groups = layout.num_kv_heads // tp_size
        heads_per_group = layout.num_heads // layout.num_kv_heads
        qs, ks, vs = [], [], []
        for shard in shards:
            tail = shard.shape[1:]
            per_group = shard.reshape(groups, (heads_per_group + 2) * layout.head_dim, *tail)
            q, k, v = per_group.split(
                [heads_per_group * layout.head_dim, layout.head_dim, layout.head_dim], dim=1
            )
            qs.append(q.reshape(-1, *tail))
            ks.append(k.reshape(-1, *tail))
            vs.append(v.reshape(-1, *tail))
        return [torch.cat(qs), torch.cat(ks), torch.cat(vs)]
    if rule.fuse == "gate_up":
        gates, ups = zip(*(shard.chunk(2, dim=0) for shard in shards))
        return [torch.cat(gates), torch.cat(ups)]
    return [torch.cat(shards, dim=_split_dim(rule.split))]
