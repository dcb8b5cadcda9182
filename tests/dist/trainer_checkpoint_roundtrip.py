"""Trainer on this machine's default device/dtype (bf16 + NCCL on GPU): updates, then a checkpoint save/load
round trip must reproduce the next update exactly. Args: HF_DIR OUT_JSON CKPT_DIR"""

from __future__ import annotations

import json
import sys

import torch

from megatron_m2po import platform
from megatron_m2po.config import Config
from megatron_m2po.types import Group, Sample


def make_group(prompt_id: str, version: int) -> Group:
    g = torch.Generator().manual_seed(len(prompt_id))
    samples = []
    for j in range(4):
        n = 5 + j
        resp = torch.randint(3, 250, (n,), generator=g).tolist()
        blp = (-3 - torch.rand(n, generator=g)).tolist()
        samples.append(
            Sample(prompt_id, j, [1, 5, 6, 7], resp, blp, [version] * n, "stop", reward=float(j % 2))
        )
    return Group(prompt_id, [1, 5, 6, 7], samples)


def main(hf_dir: str, out: str, ckpt_dir: str) -> None:
    cfg = Config()
    cfg.model.path, cfg.data.path = hf_dir, "unused"
    cfg.train.groups_per_step = cfg.train.groups_per_update = 1
    cfg.train.responses_per_prompt, cfg.train.micro_batch_size, cfg.train.lr = 4, 2, 1e-3
    platform.init_distributed(1, 1, seed=0)
    from megatron_m2po.trainer import checkpointing
    from megatron_m2po.trainer.policy import Policy

    trainer = Policy(cfg)
    first = [trainer.update_collective([make_group(p, 0)], v) for v, p in enumerate(("a", "bb"))]
    state = {"step": 2, "scheduler": trainer.scheduler.state_dict()}
    checkpointing.save_checkpoint_collective(ckpt_dir, 2, trainer.model, trainer.optimizer, state, keep_last=1)
    before = trainer.update_collective([make_group("ccc", 0)], 2)
    saved = checkpointing.load_checkpoint_collective(
        checkpointing.latest_checkpoint(ckpt_dir), trainer.model, trainer.optimizer
    )
    trainer.scheduler.load_state_dict(saved["scheduler"])
    after = trainer.update_collective([make_group("ccc", 0)], 2)
    result = {
        "dtype": str(trainer.dtype),
        "device": str(next(trainer.model.parameters()).device),
        "first": [[m["loss/value"], m["train/grad_norm"]] for m in first],
        "before": [before["loss/value"], before["train/grad_norm"]],
        "after": [after["loss/value"], after["train/grad_norm"]],
    }
    json.dump(result, open(out, "w"))
    platform.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
