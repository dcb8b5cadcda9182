"""Distributed-optimizer checkpoints: save at one DP size, resume at the same or another, the next update is equal.

Args: HF_DIR OUT_JSON CKPT_DIR MODE [section.key=value ...]
MODE save: two updates, save, then the third update (the reference); MODE load: restore, the third update.
Rank 0 writes the third update's loss, grad norm and the weights' checksum after it.
"""

from __future__ import annotations

import json
import sys

import torch

from megatron_m2po import platform
from megatron_m2po.config import Config, parse_override
from tests.dist.trainer_update import broadcast_metrics, make_groups


def main(hf_dir: str, out: str, ckpt_dir: str, mode: str, *overrides: str) -> None:
    torch.set_num_threads(1)
    cfg = Config()
    cfg.model.path, cfg.data.path = hf_dir, "unused"
    cfg.train.groups_per_step = cfg.train.groups_per_update = 2
    cfg.train.responses_per_prompt, cfg.train.micro_batch_size, cfg.train.lr = 4, 2, 1e-3
    cfg.parallel.distributed_optimizer = True
    for key, value in map(parse_override, overrides):
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    platform.init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline, seed=0)
    from megatron_m2po.checkpoint.gather import iter_hf_tensors
    from megatron_m2po.trainer import checkpointing
    from megatron_m2po.trainer.policy import Policy

    trainer = Policy(cfg)
    if mode == "save":
        for version, prefix in enumerate(("a", "b")):
            trainer.update_collective(make_groups(prefix, 0), version=version)
        state = {"step": 2, "scheduler": trainer.scheduler.state_dict()}
        checkpointing.save_checkpoint_collective(ckpt_dir, 2, trainer.model, trainer.optimizer, state, keep_last=1)
    else:
        saved = checkpointing.load_checkpoint_collective(
            checkpointing.latest_checkpoint(ckpt_dir), trainer.model, trainer.optimizer
        )
        trainer.scheduler.load_state_dict(saved["scheduler"])
    m = broadcast_metrics(
        trainer.update_collective(make_groups("c", 0), version=2), torch.distributed.get_world_size() - 1
    )
    tensors = iter_hf_tensors(trainer.model, trainer.hf_config)
    checksum = sum(float(t.double().abs().sum()) for _, t in tensors if t is not None)
    if torch.distributed.get_rank() == 0:
        json.dump(
            {"loss": m["loss/value"], "grad_norm": m["train/grad_norm"], "weights": checksum}, open(out, "w")
        )
    platform.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
