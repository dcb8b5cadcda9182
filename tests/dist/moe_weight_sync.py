"""Weight sync of a Qwen3-MoE trained at EP = 2 (2 processes, gloo) into a CPU engine server.

    torchrun --nproc-per-node 2 tests/dist/moe_weight_sync.py HF_DIR LOG_DIR

Each rank holds half of every layer's experts. After a change to every weight, rank 0 pushes the policy
to a local engine server over the distributed transport (SGLang's /update_weights_from_distributed, gloo
here), rank 1 takes part in the gather; the buckets must carry every expert of both ranks under the Hub
names, which the server loads into transformers' fused experts. Asserts (exit non-zero on failure): the
update carries the model's every byte, the engine is at the new version, and its log-probs equal the
trainer's own recompute at EP = 2 (and differ from before the update, so the check can fail).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megatron_m2po import platform  # noqa: E402
from megatron_m2po.checkpoint.hf_io import HFSafetensorsReader  # noqa: E402
from megatron_m2po.checkpoint import load_policy  # noqa: E402
from megatron_m2po.models import load_hf_config  # noqa: E402
from megatron_m2po.sync import WeightSync  # noqa: E402
from tests.test_weight_sync import PARAMS, PROMPTS, gloo_sync, max_diff, trainer_logprobs  # noqa: E402


def main(hf_dir: Path, log_dir: Path) -> None:
    torch.set_num_threads(1)
    platform.init_distributed(expert_parallel=2)
    rank = torch.distributed.get_rank()
    hf_config = load_hf_config(hf_dir)
    model = load_policy(hf_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)  # the same draws on both ranks: replicated weights stay equal, experts all move
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))

    if rank != 0:
        WeightSync(model, hf_config, None).push_collective(version=2)
        samples = None
    else:
        from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher

        with EngineLauncher(hf_dir, servers=1, backend="local", log_dir=log_dir) as launcher:
            (engine,) = launcher.engines()
            sync = gloo_sync(model, hf_config, engine, bucket_bytes=16 << 10)

            def generate():
                coro = engine.generate("q", PROMPTS[0], 2, PARAMS)
                return asyncio.run_coroutine_threadsafe(coro, sync.loop).result()

            before = generate()
            metrics = sync.push_collective(version=2)
            samples = generate()
            asyncio.run_coroutine_threadsafe(engine.close(), sync.loop).result()
            sync.close()
        with HFSafetensorsReader(hf_dir) as reader:
            total = sum(reader.read(n).numel() * 4 for n in reader.names())
        assert metrics["sync/bytes"] == total, (metrics["sync/bytes"], total)
        assert metrics["sync/buckets"] > 1 and engine.version == 2
        assert all(s.versions == [2] * len(s.response_ids) for s in samples)
    shared = [samples, None if rank else before]
    torch.distributed.broadcast_object_list(shared, src=0)
    samples, before = shared
    ours = trainer_logprobs(model, samples)  # collective under EP: both ranks run the same batch
    moved = trainer_logprobs(model, before)
    if rank == 0:
        assert max_diff(before, moved) > 1e-3, "the change to the weights did not move the policy"
        assert max_diff(samples, ours) <= 1e-5, max_diff(samples, ours)
    print(f"rank {rank}: engine at v2 after an EP=2 sync, log-probs match the trainer", flush=True)
    platform.destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
