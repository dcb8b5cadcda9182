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
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
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


def prepare_for_load(optimizer) -> None:
    """Give a distributed optimizer's torch Adam that has not stepped yet a state to load a checkpoint into.

    Megatron's distributed optimizer reads every parameter's Adam `step` when it builds the state dict a
    checkpoint is loaded into (with TE / Apex's fused Adam the step lives in the param groups instead), and
    torch's Adam creates its state only at the first step. Step 0 and zero moments, all overwritten by the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or not isinstance(
            inner, torch.optim.Adam | torch.optim.AdamW
        ):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }


def load_optimizer_state(optimizer, state_dict) -> None:
    """`optimizer.load_state_dict`, made exact for the distributed optimizer over torch's Adam.

    Under no_grad: with fp32 params the distributed optimizer's main params are views of the model's
    (leaf) params, and it copies the loaded values into them. After it: its per-parameter copy leaves
    torch Adam's `step` at the value of the state it loaded into (0 on a fresh optimizer, `prepare_for_load`)
    instead of the checkpoint's, which it keeps in the param groups; each parameter gets that step again,
    as its own tensor (torch increments it in place).
    """
    with torch.no_grad():
        optimizer.load_state_dict(state_dict)
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(chained) == 1:
        parts = [state_dict]
    else:
        parts = (
            [v for _, v in sorted(state_dict.items())] if isinstance(state_dict, dict) else list(state_dict)
        )
    for opt, part in zip(chained, parts):
        if not isinstance(opt, DistributedOptimizer) or not isinstance(
            opt.optimizer, torch.optim.Adam | torch.optim.AdamW
        ):
            continue
        steps = {g["step"] for g in part["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step)
