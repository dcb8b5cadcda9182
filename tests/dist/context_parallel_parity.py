"""CP = 2 on two processes gives CP = 1's per-token log-probs and parameter gradients, padded and packed.

The trainer's own pieces run both layouts: `Policy`'s micro-batch shapes (`batching.make_microbatches`, sequences
padded to 2 x CP), `step.run_model` (this CP rank's chunks, their positions, routed experts) and
`step.token_logprobs` (log-probs gathered back to sequence order). Gradients: the CP ranks' gradients summed
(what DDP's reduce over DP x CP does) equal one rank's at CP = 1. An MoE model replays random routing (its
routers' choices then cannot flip between layouts). Ranks: 2 (CPUs under gloo, or GPUs with Transformer
Engine's attention). Args: HF_DIR... Prints one line per model and layout.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from megatron_m2po import platform
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.models import load_hf_config, unwrap_model
from megatron_m2po.trainer.batching import SequenceRow, make_microbatches, packed_segment_length
from megatron_m2po.trainer.step import run_model, token_logprobs

LENGTHS = (37, 9, 20, 19)  # micro-batches (37, 9) and (20, 19): padded to 40 + 12 and 20 + 20 at CP = 2
PLAN = ((0, 1), (2, 3))
PROMPT = 5


def make_rows(vocab: int, hf_config) -> list[SequenceRow]:
    g = torch.Generator().manual_seed(7)
    rows = []
    layers = hf_config.num_hidden_layers
    top_k = getattr(hf_config, "num_experts_per_tok", None)
    experts = getattr(hf_config, "num_experts", None)
    for n in LENGTHS:
        routed = None
        if experts:  # distinct experts per token, as an engine's top-k is
            scores = torch.rand(n - 1, layers, experts, generator=g)
            routed = scores.topk(top_k, dim=-1).indices.numpy().astype(np.uint8)
        rows.append(
            SequenceRow(
                tokens=torch.randint(3, vocab, (n,), generator=g).tolist(),
                prompt_len=PROMPT,
                behavior_logprobs=[-1.0] * (n - PROMPT),
                engine_logprobs=[-1.0] * (n - PROMPT),
                advantage=1.0,
                versions=[0] * (n - PROMPT),
                routed_experts=routed,
            )
        )
    return rows


def microbatches(rows, pack: bool):
    """The micro-batches as `Policy._microbatches` shapes them at CP = 2 (lengths padded to multiples of 4);
    CP = 1 runs the same shapes, so that an MoE model's load-balancing loss, which counts padding, is too."""
    if pack:
        return make_microbatches(
            rows, PLAN, consumer_version=0, pad_id=0, pack=True, multiple=4, segment_multiple=4
        )
    seq_len = packed_segment_length(max(LENGTHS), 4)
    return make_microbatches(
        rows, PLAN, consumer_version=0, pad_id=0, pack=False, seq_len=seq_len, batch_size=2
    )


def logprobs_and_grads(path: str, cp: int, pack: bool, routing_replay: bool, ep: int = 1):
    platform.init_distributed(context_parallel=cp, expert_parallel=ep)
    from megatron.core import parallel_state

    hf_config = load_hf_config(path)
    model = load_policy(path, routing_replay=routing_replay)  # fp32 on CPU, bf16 on GPUs (TE attention)
    rows = make_rows(hf_config.vocab_size, hf_config)
    weights = torch.Generator().manual_seed(3)
    out = []
    for mb in microbatches(rows, pack):
        mb = mb.to(platform.device())
        if not routing_replay:
            mb.routed_experts = None
            if mb.packed is not None:
                mb.packed.routed_experts = None
        lp = token_logprobs(run_model(model, mb), mb, temperature=0.7)
        w = torch.rand(lp.shape, generator=weights).to(lp.device)
        (lp * mb.response_mask * w).sum().backward()
        out.append(lp.detach().clone())
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        if ".experts." in name and ep > 1:
            # an expert lives on one EP rank, which the tokens of every CP rank reach: its gradient is whole
            # there; at CP = 1 both ranks (DP = 2, the same micro-batches) send it every token twice
            grad = grad if cp > 1 else grad / 2
        else:
            torch.distributed.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        grads[name] = grad
    attention = type(unwrap_model(model).decoder.layers[0].self_attention.core_attention).__name__
    return out, grads, attention


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main(*args: str) -> None:
    """Args: [ep2] HF_DIR...: ep2 runs the MoE models at EP = 2 in both layouts (the EP group is the CP group
    at CP = 2, the DP group at CP = 1)."""
    ep, paths = (2, args[1:]) if args[0] == "ep2" else (1, args)
    torch.set_num_threads(1)
    # fp32 (CPU): equal up to summation order; bf16 (GPU): TE's ring attention rounds differently
    tolerance = 1e-5 if platform.default_dtype() == torch.float32 else 5e-2
    for path in paths:
        hf_config = load_hf_config(path)
        moe = bool(getattr(hf_config, "num_experts", None))
        for pack in (False, True):
            name = f"{hf_config.architectures[0]} {'packed' if pack else 'padded'}" + (
                " ep2" if ep > 1 else ""
            )
            ref_lp, ref_grads, _ = logprobs_and_grads(path, 1, pack, routing_replay=moe, ep=ep)
            lp, grads, attention = logprobs_and_grads(path, 2, pack, routing_replay=moe, ep=ep)
            for i, (a, b) in enumerate(zip(lp, ref_lp)):
                assert a.shape == b.shape, (name, i, a.shape, b.shape)
                assert torch.allclose(a, b, rtol=tolerance, atol=tolerance), (
                    name,
                    "logprobs",
                    i,
                    (a - b).abs().max(),
                )
            assert sorted(grads) == sorted(ref_grads), name
            checked = 0
            for key, ref in ref_grads.items():
                if ref.abs().sum() == 0:
                    continue  # an expert no replayed token was routed to
                assert rel_diff(grads[key], ref) <= tolerance, (name, key, rel_diff(grads[key], ref))
                checked += 1
            assert checked >= len(grads) // 2, (name, "too few non-zero gradients to compare", checked)
            print(f"{name}: log-probs and {checked} gradients match CP = 1 ({attention})", flush=True)
    platform.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
