"""transformers' own Qwen3-MoE as the reference for the Megatron MoE policy: logits, gradients under the
per-expert Hub names, the experts it routes each token to, and how clear those choices are.

Routing can only be compared where it is decided: if a token's k-th and (k+1)-th router logits are
closer than the two implementations' numerical difference (~1e-6 in fp32), either may pick either expert.
`assert_clear_margins` checks that every token of every layer has a gap of at least `MIN_MARGIN` there, so
equal routing is a real check and no near-tie can flip it (the tiny models' routers are drawn with
`models.tiny.ROUTER_STD`, which makes such gaps typical; the fixed inputs of the tests meet the bound).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

MIN_MARGIN = 1e-3

_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def router_margins(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per token: the k-th largest router logit minus the (k+1)-th."""
    top = router_logits.float().topk(top_k + 1, dim=-1).values
    return top[..., top_k - 1] - top[..., top_k]


def assert_clear_margins(router_logits: tuple[torch.Tensor, ...], top_k: int) -> None:
    for layer, logits in enumerate(router_logits):
        margin = router_margins(logits, top_k).min().item()
        assert margin >= MIN_MARGIN, (
            f"layer {layer}: a top-{top_k} router margin of {margin:.2e} < {MIN_MARGIN}"
        )


def hf_topk_masks(router_logits: tuple[torch.Tensor, ...], top_k: int, batch: int) -> list[torch.Tensor]:
    """Per layer the [seq, batch, experts] boolean mask of chosen experts (Megatron's token order: s, b)."""
    masks = []
    for logits in router_logits:
        chosen = logits.topk(top_k, dim=-1).indices
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        masks.append(mask.reshape(batch, -1, logits.shape[-1]).transpose(0, 1))
    return masks


def per_expert_tensors(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """transformers 5 holds an MoE layer's experts fused ([experts, 2 x ffn, hidden] gate|up, and down);
    split them into the per-expert Hub names."""
    match = _FUSED.match(name)
    if not match:
        return [(name, tensor)]
    prefix, kind = match.groups()
    if kind == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", t) for e, t in enumerate(tensor)]
    gate, up = tensor.chunk(2, dim=1)
    return [(f"{prefix}.{e}.gate_proj.weight", g) for e, g in enumerate(gate)] + [
        (f"{prefix}.{e}.up_proj.weight", u) for e, u in enumerate(up)
    ]


def hf_named_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        out.update(per_expert_tensors(name, grad.detach().clone()))
    return out


@contextmanager
def megatron_routing(model):
    """Record each Megatron MoE router's routing map: {global layer (0-based): [tokens, experts] bool}."""
    from megatron.core.transformer.moe.router import TopKRouter

    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, TopKRouter):

            def hook(mod, args, output):
                seen.setdefault(mod.layer_number - 1, []).append(output[1].detach().clone())

            handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """|a - b| <= tol, relative to the reference's scale where it exceeds 1 (gradients of summed logits)."""
    return max_abs_diff(a, b) <= tol * max(1.0, b.abs().max().item())


@contextmanager
def hf_forced_routing(model, routed_experts: torch.Tensor):
    """transformers' Qwen3-MoE routing the tokens of a [batch, seq] forward to `routed_experts`
    [batch, seq, layers, top_k]: each router's scores are its own softmax probabilities at the given experts
    (renormalised under norm_topk_prob), the reference for a replayed forward."""
    handles = []
    for layer, block in enumerate(model.model.layers):
        gate = block.mlp.gate

        def hook(mod, args, output, layer=layer):
            logits = output[0]
            indices = routed_experts[:, :, layer, :].reshape(-1, mod.top_k).long()
            scores = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, indices)
            if mod.norm_topk_prob:
                scores = scores / scores.sum(dim=-1, keepdim=True)
            return logits, scores.to(logits.dtype), indices

        handles.append(gate.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hf_routed_experts(router_logits: tuple[torch.Tensor, ...], top_k: int, batch: int) -> torch.Tensor:
    """transformers' own top-k per token as [batch, seq, layers, top_k] (what an engine reports)."""
    per_layer = [
        torch.topk(logits.float(), top_k, dim=-1).indices.reshape(batch, -1, top_k)
        for logits in router_logits
    ]
    return torch.stack(per_layer, dim=2)
