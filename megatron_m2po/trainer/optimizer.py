"""Megatron DDP wrapper, Megatron optimizer and its LR/WD scheduler, built from the config.

Megatron-core's own pieces, as they are: `DistributedDataParallel` (gradient buckets and the DP
all-reduce, or with `parallel.distributed_optimizer` the reduce-scatter), `get_megatron_optimizer` (AdamW,
grad clipping by global norm, mixed-precision master weights on GPU; ZeRO-1 sharding of master weights
and moments over DP with the distributed optimizer) and `OptimizerParamScheduler`.

The parameter all-gather of the distributed optimizer runs inside `optimizer.step()` (Megatron's
`overlap_param_gather` would defer it to the next forward's pre-hooks, but here the engines read the
weights right after the update, so the gather has to finish there anyway).
"""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_m2po import platform
from megatron_m2po.config import Config, ParallelConfig


def wrap_ddp(model: torch.nn.Module, parallel: ParallelConfig | None = None) -> DistributedDataParallel:
    """Wrap with Megatron DDP and point the pipeline schedules at its grad-sync hooks."""
    parallel = parallel or ParallelConfig()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.distributed_optimizer,
        average_in_collective=False,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    # The schedules call these: no grad all-reduce between micro-batches, one DP all-reduce at the end.
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(cfg: Config, ddp: DistributedDataParallel, dtype: torch.dtype):
    """Megatron AdamW + scheduler; the scheduler counts optimizer updates (not steps)."""
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.grad_clip,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=not platform.on_gpu())
    ddp.config.grad_scale_func = optimizer.scale_loss
    total_updates = t.steps * cfg.updates_per_step
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_updates else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_updates,
        lr_decay_steps=max(total_updates, t.warmup_updates + 1),
        lr_decay_style=t.lr_schedule,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(total_updates, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
    )
    return optimizer, scheduler
