"""Two optimizer updates of the real trainer on fixed groups; rank 0 writes losses, grad norms and a weight checksum.

Run with torchrun at any TP x DP: tests/test_trainer_update.py compares the JSON across layouts.
Args: HF_DIR OUT_JSON TP PP LOSS [section.key=value ...] (config overrides, e.g. train.pack_sequences=true)
"""

from __future__ import annotations

import json
import sys

import torch

from megatron_m2po import platform
from megatron_m2po.config import Config, parse_override
from megatron_m2po.types import Group, Sample


def make_groups(prefix: str, version: int) -> list[Group]:
    """Two prompts x 4 responses of varied lengths, rewards and behaviour log-probs (deterministic)."""
    g = torch.Generator().manual_seed(ord(prefix[0]))  # not hash(): randomized per process
    groups = []
    for p in range(2):
        prompt = [1, 40 + p, 41, 42 + p]
        samples = []
        for j in range(4):
            n = 3 + (j * 2 + p) % 5
            resp = torch.randint(3, 250, (n,), generator=g).tolist()
            blp = (-3.0 - torch.rand(n, generator=g) * 3).tolist()
            samples.append(
                Sample(
                    f"{prefix}{p}", j, prompt, resp, blp, [version] * n, "stop", reward=float(j % 2 == p % 2)
                )
            )
        groups.append(Group(f"{prefix}{p}", prompt, samples))
    return groups


def broadcast_metrics(m: dict, src: int) -> dict:
    box = [m]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def main(hf_dir: str, out: str, tp: int, pp: int, loss: str, *overrides: str) -> None:
    torch.set_num_threads(1)
    cfg = Config()
    cfg.model.path, cfg.data.path = hf_dir, "unused"
    cfg.train.groups_per_step = cfg.train.groups_per_update = 2
    cfg.train.responses_per_prompt = 4
    cfg.train.micro_batch_size = 2
    cfg.train.lr = 1e-3
    cfg.algorithm.loss = loss
    cfg.parallel.tensor, cfg.parallel.pipeline = tp, pp
    for key, value in map(parse_override, overrides):
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    platform.init_distributed(tp, pp, seed=0, context_parallel=cfg.parallel.context)
    from megatron_m2po.checkpoint.gather import iter_hf_tensors
    from megatron_m2po.trainer.policy import Policy

    trainer = Policy(cfg)
    last_stage = torch.distributed.get_world_size() - 1  # holds the loss metrics
    results = []
    for i, prefix in enumerate(("a", "b")):
        m = trainer.update_collective(make_groups(prefix, 0), version=i)
        m = broadcast_metrics(m, last_stage)
        results.append(
            {
                k: m[k]
                for k in ("loss/value", "train/grad_norm", "loss/masked_fraction", "loss/num_tokens")
                if k in m
            }
        )
    checksum = 0.0
    for _name, t in iter_hf_tensors(trainer.model, trainer.hf_config):
        if t is not None:
            checksum += float(t.double().abs().sum())
    if torch.distributed.get_rank() == 0:
        json.dump({"updates": results, "weights_abs_sum": checksum}, open(out, "w"))
    platform.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], *sys.argv[6:])
