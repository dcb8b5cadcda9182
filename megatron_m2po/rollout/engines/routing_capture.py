"""The experts a transformers MoE model routes each token to, read from its routers during a forward.

The local engine returns them with every sample (`Sample.routed_experts`) so the trainer can replay them:
transformers' Qwen3-MoE routers (`mlp.gate`) return (logits, scores, top-k indices); a forward hook keeps
the indices of the latest forward, one [tokens, top_k] tensor per MoE layer.
"""

from __future__ import annotations

import numpy as np
import torch


class RoutingCapture:
    """Forward hooks on every MoE router of an HF causal LM; `take(rows, q)` gives the latest forward's
    routing as [rows, q, layers, top_k] (the model's layer order)."""

    def __init__(self, model: torch.nn.Module):
        layers = model.model.layers
        gates = [getattr(layer.mlp, "gate", None) for layer in layers]
        if not gates or any(gate is None or not hasattr(gate, "top_k") for gate in gates):
            raise ValueError(
                f"{type(model).__name__}: routed experts are recorded for MoE models whose every layer routes "
                "(mlp.gate with top_k), as Qwen3-MoE"
            )
        self._latest: list[torch.Tensor | None] = [None] * len(gates)
        for index, gate in enumerate(gates):
            gate.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def keep(module, args, output) -> None:
            self._latest[index] = output[2]

        return keep

    def take(self, rows: int, q: int) -> torch.Tensor:
        """[rows, q, layers, top_k] of the latest forward of `rows` x `q` positions (cleared after)."""
        if any(t is None for t in self._latest):
            raise RuntimeError("no routing was recorded: the model ran no forward since the last take")
        out = torch.stack([t.reshape(rows, q, -1) for t in self._latest], dim=2)
        self._latest = [None] * len(self._latest)
        return out


def compact(routing: list[torch.Tensor]) -> np.ndarray:
    """Concatenated [tokens, layers, top_k] routing as the smallest unsigned integer array that holds it."""
    joined = torch.cat(routing).cpu().numpy()
    return joined.astype(np.uint8 if joined.size == 0 or joined.max() < 256 else np.uint16)
