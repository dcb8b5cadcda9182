"""TP=2 or PP=2 (2 processes, gloo) vs TP=1 in the same job: logits, gradients, and weight round trip.

    torchrun --nproc-per-node 2 tests/dist/model_parallel_parity.py {tp|pp} WORKDIR

WORKDIR holds tiny HF dirs `<arch>/` and converted Megatron dirs `<arch>-megatron/` made by the pytest.
Asserts (exit non-zero on failure): logits and HF-named gradients match TP=1 to a relative 1e-5, and
`iter_hf_tensors` of the model loaded from the Megatron checkpoint is bitwise equal to the HF weights.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch

from megatron_m2po import platform
from megatron_m2po.checkpoint import export_hf_dir_collective, iter_hf_tensors
from megatron_m2po.checkpoint.hf_io import HFSafetensorsReader
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.models import forward_logits, load_hf_config

ARCHS = ("qwen3", "qwen2", "llama")
BATCH, SEQ, MICRO_BATCHES = 2, 12, 2


def inputs_and_weights(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (MICRO_BATCHES, BATCH, SEQ), generator=g)
    weights = torch.randn(MICRO_BATCHES, BATCH, SEQ, vocab, generator=g)
    return ids, weights


def hf_named_grads(model, hf_config) -> dict[str, torch.Tensor]:
    """Gradients under HF names, via iter_hf_tensors on a parameter->gradient swap."""
    params = [p for p in model.parameters()]
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p.data)
    grads = {name: t.clone() for name, t in iter_hf_tensors(model, hf_config) if t is not None}
    for p, data in zip(params, saved):
        p.data = data
    return grads


def finalize_grads(model) -> None:
    """What Megatron's finalize_model_grads does (it needs a DDP wrapper, which this test has no use for):
    sum q/k-layernorm grads over TP (each rank saw only its heads), and the two tied-embedding copies' grads."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        for name, param in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                torch.distributed.all_reduce(
                    param.grad, group=parallel_state.get_tensor_model_parallel_group()
                )
    if (
        model.share_embeddings_and_output_weights
        and parallel_state.get_pipeline_model_parallel_world_size() > 1
    ):
        if parallel_state.is_rank_in_embedding_group():
            weight = model.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


def vocab_slice(weights: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    tp, rank = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    return weights.chunk(tp, dim=-1)[rank]


def run_single_stage(model, ids, weights):
    """TP>=1, PP=1: plain forward per micro-batch; loss mean over micro-batches (as the schedule does)."""
    from megatron.core import parallel_state

    logits_all = []
    for mb in range(MICRO_BATCHES):
        logits = forward_logits(model, ids[mb])
        ((logits * vocab_slice(weights[mb])).sum() / MICRO_BATCHES).backward()
        logits = logits.detach()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(
                parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
            )
            logits = torch.cat(parts, dim=-1)
        logits_all.append(logits)
    return torch.stack(logits_all)


def run_pipeline(model, ids, weights):
    """PP>1: Megatron's own pipeline schedule; the last stage collects logits."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected = []
    batches = iter(range(MICRO_BATCHES))

    def loss_func(mb, output_tensor):
        collected.append(output_tensor.detach())
        return (output_tensor * weights[mb]).sum(), {}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
        return model(ids[mb], positions, None), partial(loss_func, mb)

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    # ship the last stage's logits to every rank
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    out = torch.stack(collected) if collected else torch.empty(MICRO_BATCHES, BATCH, SEQ, weights.shape[-1])
    torch.distributed.broadcast(out, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return out


def compute(path: Path, tp: int, pp: int, ids, weights, export_to: Path | None = None):
    platform.init_distributed(tensor_parallel=tp, pipeline_parallel=pp)
    hf_config = load_hf_config(path)
    model = load_policy(path)
    if export_to is not None:
        export_hf_dir_collective(model, hf_config, export_to, source_dir=path, max_shard_bytes=64 * 1024)
    logits = run_pipeline(model, ids, weights) if pp > 1 else run_single_stage(model, ids, weights)
    finalize_grads(model)
    grads = hf_named_grads(model, hf_config)
    weights_hf = {name: t.clone() for name, t in iter_hf_tensors(model, hf_config) if t is not None}
    return logits, grads, weights_hf


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main(mode: str, workdir: Path) -> None:
    torch.set_num_threads(1)
    tp, pp = (2, 1) if mode == "tp" else (1, 2)
    rank = int(os.environ["RANK"])
    for arch in ARCHS:
        hf_dir, megatron_dir = workdir / arch, workdir / f"{arch}-megatron"
        vocab = load_hf_config(hf_dir, tensor_parallel=1).vocab_size
        ids, weights = inputs_and_weights(vocab)
        ref_logits, ref_grads, _ = compute(hf_dir, 1, 1, ids, weights)
        logits, grads, _ = compute(hf_dir, tp, pp, ids, weights)
        exported = workdir / f"{arch}-{mode}-export"
        _, _, from_megatron = compute(megatron_dir, tp, pp, ids, weights, export_to=exported)
        assert rel_diff(logits, ref_logits) <= 1e-5, (arch, mode, "logits", rel_diff(logits, ref_logits))
        if rank == 0:
            assert sorted(grads) == sorted(ref_grads), (arch, sorted(set(grads) ^ set(ref_grads)))
            for name, ref in ref_grads.items():
                assert ref.abs().sum() > 0, (arch, name, "zero reference gradient")
                assert rel_diff(grads[name], ref) <= 1e-5, (arch, mode, name, rel_diff(grads[name], ref))
            with HFSafetensorsReader(hf_dir) as reader:
                assert sorted(from_megatron) == sorted(reader.names()), (arch, "names")
                for name, tensor in from_megatron.items():
                    assert torch.equal(tensor, reader.read(name)), (arch, mode, name, "not bitwise equal")
            with HFSafetensorsReader(hf_dir) as reader, HFSafetensorsReader(exported) as export:
                assert sorted(export.names()) == sorted(reader.names()), (arch, "exported names")
                for name in reader.names():
                    assert torch.equal(export.read(name), reader.read(name)), (
                        arch,
                        mode,
                        name,
                        "export differs",
                    )
            assert (exported / "tokenizer.json").exists() and (exported / "config.json").exists()
        print(f"{arch} {mode}: logits, {len(grads)} gradients and weights match", flush=True)
    platform.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
