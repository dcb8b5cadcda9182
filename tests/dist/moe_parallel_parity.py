"""Megatron Qwen3-MoE at EP=2, TP=2 or PP=2 (2 processes, gloo) against transformers' own Qwen3-MoE.

    torchrun --nproc-per-node 2 tests/dist/moe_parallel_parity.py {ep|tp|pp} HF_DIR [MEGATRON_DIR]

Asserts (exit non-zero on failure), fp32: logits and every HF-named gradient (experts under their
per-expert Hub names, gathered from both EP ranks) equal transformers' to 1e-4 (1e-3 on GPUs, where
Megatron runs Transformer Engine's grouped GEMM and the alltoall dispatcher), every MoE router sends
every token to the experts transformers sends it to, with a clear top-k margin on every token (see
tests/moe_reference.py), and `iter_hf_tensors` gives back the HF weights bitwise, also for the model
loaded from MEGATRON_DIR (the converter's checkpoint of HF_DIR, resharded on load to this layout).

With the routers replaying random expert choices (routing replay: what an engine reports), the logits equal
transformers' with its routers forced to the same experts, at each layout.

Layouts: ep = EP 2 (whole experts, ETP 1; the two ranks are data-parallel for the dense weights, so each
takes half of the batch); tp = TP 2 with sequence parallelism (MoE training needs it) and experts split
over the same 2 ranks (ETP = TP); pp = PP 2 through Megatron's pipeline schedule. The load-balancing loss
is off on both sides (transformers adds it only with labels; its formula differs from Megatron's).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from megatron_m2po import platform
from megatron_m2po.checkpoint import iter_hf_tensors, load_policy
from megatron_m2po.checkpoint.hf_io import HFSafetensorsReader
from megatron_m2po.config import ParallelConfig
from megatron_m2po.models import forward_logits, load_hf_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.dist.model_parallel_parity import BATCH, MICRO_BATCHES, SEQ, run_pipeline  # noqa: E402
from tests.moe_reference import (  # noqa: E402
    assert_clear_margins,
    close,
    hf_forced_routing,
    hf_named_grads,
    hf_topk_masks,
    max_abs_diff,
    megatron_routing,
)

TOL = 1e-3 if torch.cuda.is_available() else 1e-4
LAYOUTS = {  # mode: (tp, pp, ep, etp)
    "ep": (1, 1, 2, 1),
    "tp": (2, 1, 1, 2),
    "pp": (1, 2, 1, 1),
}


def inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids avoid the pad id 0: transformers' embedding holds its row's gradient at zero (padding_idx)."""
    g = torch.Generator().manual_seed(2024)
    ids = torch.randint(1, vocab, (MICRO_BATCHES, BATCH, SEQ), generator=g)
    weights = torch.randn(MICRO_BATCHES, BATCH, SEQ, vocab, generator=g)
    return ids.to(platform.device()), weights.to(platform.device())


def reference(hf_dir: Path, ids, weights):
    """transformers: logits, per-expert gradients of sum(logits * weights) / micro-batches, routing masks."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.to(platform.device()).train()
    top_k = model.config.num_experts_per_tok
    logits, masks = [], []
    for mb in range(MICRO_BATCHES):
        out = model(ids[mb], output_router_logits=True)
        assert_clear_margins(out.router_logits, top_k)
        ((out.logits * weights[mb]).sum() / MICRO_BATCHES).backward()
        logits.append(out.logits.detach())
        masks.append(hf_topk_masks(out.router_logits, top_k, BATCH))
    return torch.stack(logits), hf_named_grads(model), masks


def finalize_grads(model) -> None:
    """The gradient reductions of Megatron's DDP + finalize_model_grads (summed, not averaged: the loss is
    a sum over the whole batch): dense weights over DP, experts under EP over the expert-DP group,
    sequence-parallel weights (norms, routers) and q/k norms over TP."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        expert_parallel = not getattr(param, "allreduce", True)
        group = ps.get_expert_data_parallel_group() if expert_parallel else ps.get_data_parallel_group()
        if torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(param.grad, group=group)
        if ps.get_tensor_model_parallel_world_size() > 1 and (
            getattr(param, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name
        ):
            torch.distributed.all_reduce(param.grad, group=tp_group)


def megatron_named_grads(model, hf_config) -> dict[str, torch.Tensor]:
    params = list(model.parameters())
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad
    grads = {name: t.clone() for name, t in iter_hf_tensors(model, hf_config) if t is not None}
    for p, data in zip(params, saved):
        p.data = data
    return grads


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def run_single_stage(model, ids, weights, rows: slice):
    logits = []
    for mb in range(MICRO_BATCHES):
        out = forward_logits(model, ids[mb, rows])
        from megatron.core import parallel_state as ps

        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        ((out * weights[mb, rows].chunk(tp, dim=-1)[rank]).sum() / MICRO_BATCHES).backward()
        logits.append(gather_vocab(out.detach()))
    return torch.stack(logits)


def check_routing(seen: dict[int, list[torch.Tensor]], ref_masks, rows: slice) -> int:
    """Every recorded routing map equals transformers' choices for the tokens this rank routed."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    checked = 0
    for layer, maps in seen.items():
        assert len(maps) == MICRO_BATCHES, (layer, len(maps))
        for mb, routing_map in enumerate(maps):
            expected = ref_masks[mb][layer][:, rows]  # [s, b, experts]
            if tp > 1:  # sequence parallel: this rank routes its slice of the sequence
                expected = expected.chunk(tp, dim=0)[rank]
            assert torch.equal(routing_map, expected.reshape(-1, expected.shape[-1])), (layer, mb, "routing")
            checked += routing_map.shape[0]
    return checked


def check_weights(model, hf_config, hf_dir: Path, what: str) -> None:
    """Collective: the model's weights gathered under HF names equal HF_DIR's bitwise (checked on the source)."""
    from megatron.core import parallel_state as ps

    weights = {name: t.cpu() for name, t in iter_hf_tensors(model, hf_config) if t is not None}
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
        with HFSafetensorsReader(hf_dir) as reader:
            assert sorted(weights) == sorted(reader.names()), (what, "names")
            for name, tensor in weights.items():
                assert torch.equal(tensor, reader.read(name)), (what, name, "not bitwise equal")


def engine_routing(hf_config) -> torch.Tensor:
    """Random expert choices [micro-batches, batch, seq, layers, top_k], the same on every rank: what an engine
    would report, unrelated to what either model's routers would choose."""
    g = torch.Generator().manual_seed(7)
    layers, k, experts = hf_config.num_hidden_layers, hf_config.num_experts_per_tok, hf_config.num_experts
    picks = [torch.randperm(experts, generator=g)[:k] for _ in range(MICRO_BATCHES * BATCH * SEQ * layers)]
    return torch.stack(picks).reshape(MICRO_BATCHES, BATCH, SEQ, layers, k)


@torch.no_grad()
def check_replay(model, hf_dir: Path, ids, rows: slice, mode: str) -> int:
    """Routing replay at this layout: with the routers replaying `engine_routing`, the logits (hence the
    log-probs) equal transformers' with its routers forced to the same experts. Collective."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_m2po.models.routing_replay import replayed_routing

    hf_config = load_hf_config(hf_dir)
    routed = engine_routing(hf_config).to(platform.device())
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32)
    reference.to(platform.device()).eval()
    expected = []
    for mb in range(MICRO_BATCHES):
        with hf_forced_routing(reference, routed[mb]):
            expected.append(reference(ids[mb]).logits)
    expected = torch.stack(expected)[:, rows]
    model.eval()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        logits = []
        for mb in range(MICRO_BATCHES):
            with replayed_routing(model, routed[mb, rows]):
                logits.append(gather_vocab(forward_logits(model, ids[mb, rows])))
        logits = torch.stack(logits)
    else:
        collected = []

        def forward_step(data_iterator, chunk):
            mb = next(data_iterator)
            positions = torch.arange(SEQ, device=ids.device).unsqueeze(0).expand(BATCH, SEQ)
            with replayed_routing(chunk, routed[mb]):
                output = chunk(ids[mb], positions, None)
            return output, lambda out: (collected.append(out.detach()) or out.sum(), {})

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(range(MICRO_BATCHES)),
            model=[model],
            num_microbatches=MICRO_BATCHES,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=True,
        )
        logits = torch.stack(collected) if collected else expected.clone()
        last = ps.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(logits, src=last, group=ps.get_pipeline_model_parallel_group())
    assert close(logits, expected, TOL), (mode, "replayed logits", max_abs_diff(logits, expected))
    return logits.shape[0] * logits.shape[1] * logits.shape[2]


def main(mode: str, hf_dir: Path, megatron_dir: Path | None = None) -> None:
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    tp, pp, ep, etp = LAYOUTS[mode]
    platform.init_distributed(tp, pp, expert_parallel=ep, expert_tensor_parallel=etp)
    from megatron.core import parallel_state as ps

    rank = torch.distributed.get_rank()
    hf_config = load_hf_config(hf_dir)
    ids, weights = inputs(hf_config.vocab_size)
    ref_logits, ref_grads, ref_masks = reference(hf_dir, ids, weights)

    model = load_policy(
        hf_dir,
        dtype=torch.float32,
        parallel=ParallelConfig(tensor=tp, sequence_parallel=tp > 1),
        aux_loss_coef=0.0,
        routing_replay=True,  # routes on its own until a replay is set (check_replay)
    )
    model.train()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    with megatron_routing(model) as seen:
        if pp > 1:
            logits = run_pipeline(model, ids, weights)
        else:
            logits = run_single_stage(model, ids, weights, rows)
    tokens = check_routing(seen, ref_masks, rows)
    assert close(logits, ref_logits[:, rows], TOL), (
        mode,
        "logits",
        max_abs_diff(logits, ref_logits[:, rows]),
    )
    finalize_grads(model)
    grads = megatron_named_grads(model, hf_config)
    check_weights(model, hf_config, hf_dir, f"{mode} from HF")
    if megatron_dir is not None:
        check_weights(
            load_policy(megatron_dir, dtype=torch.float32), hf_config, hf_dir, f"{mode} from Megatron"
        )
    replayed_tokens = check_replay(model, hf_dir, ids, rows, mode)
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
        assert sorted(grads) == sorted(ref_grads), (mode, sorted(set(grads) ^ set(ref_grads)))
        for name, ref in ref_grads.items():
            assert ref.abs().sum() > 0, (mode, name, "zero reference gradient")
            assert close(grads[name], ref, TOL), (mode, name, max_abs_diff(grads[name], ref))
    print(
        f"rank {rank} {mode}: logits, {len(grads)} gradients, weights and the routing of {tokens} "
        f"token-layers match transformers; replayed routing of {replayed_tokens} tokens gives its logits",
        flush=True,
    )
    platform.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
