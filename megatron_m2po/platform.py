"""The one place that knows CPU vs GPU: process groups, dtype, device, Transformer Engine, and Megatron's CUDA shims.

Megatron-core 0.16 assumes CUDA in a handful of places that are not about the math: it asks for
`torch.cuda.current_device()`, creates small bookkeeping tensors with `device="cuda"` (pipeline
schedules, grad-norm helpers, RNG tracker, causal masks), calls `torch.cuda.synchronize()`, moves
tied embeddings with `.cuda()`, and asserts `torch.cuda.FloatTensor` grads when clipping. On a machine
without CUDA, `apply_cpu_shims()` redirects exactly those to the CPU so the real Megatron model,
pipeline schedule, DDP and optimizer run unchanged under gloo. On a GPU every function here is a no-op
or picks the GPU path (NCCL, bf16, Transformer Engine layer spec).
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import tempfile
import types
from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core import tensor_parallel as mp_tensor_parallel

logger = logging.getLogger(__name__)

# Megatron modules that build tensors with device="cuda" or use torch.cuda RNG/stream helpers; each one
# gets a module-local `torch` that maps CUDA devices to the CPU (see `_CpuTorch`).
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",  # context parallelism's rotary slices (pinned)
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
_FACTORIES = frozenset(
    "zeros ones empty full tensor arange rand randn randint zeros_like ones_like empty_like full_like "
    "empty_strided as_tensor".split()
)
_shims_applied = False
_owned_store_dir: tempfile.TemporaryDirectory | None = None


def on_gpu() -> bool:
    """True when a CUDA device is usable; everything else in this module follows from it."""
    return torch.cuda.is_available()


def dist_backend() -> str:
    return "nccl" if on_gpu() else "gloo"


def default_dtype() -> torch.dtype:
    """bf16 on GPUs (what production trains in), fp32 on CPU (exact parity tests, no bf16 CPU kernels needed)."""
    return torch.bfloat16 if on_gpu() else torch.float32


def device() -> torch.device:
    if on_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_device(backend: str) -> torch.device:
    """The device a process group's tensors must live on: NCCL moves only GPU tensors, gloo only CPU ones."""
    return torch.device("cuda") if backend == "nccl" else torch.device("cpu")


def gpu_name() -> str | None:
    """This process's GPU model name (e.g. "NVIDIA H100 80GB HBM3"), or None on a CPU machine."""
    return torch.cuda.get_device_name() if on_gpu() else None


def accelerator_rng_states() -> dict[str, torch.Tensor]:
    """The GPU's RNG state under its checkpoint key, or nothing on a CPU machine (the CPU state is torch's own)."""
    return {"cuda": torch.cuda.get_rng_state()} if on_gpu() else {}


def set_accelerator_rng_states(states: dict[str, Any]) -> None:
    """Restore what `accelerator_rng_states()` saved; a GPU state resumed on a CPU machine is skipped."""
    if "cuda" in states and on_gpu():
        torch.cuda.set_rng_state(states["cuda"])


def has_transformer_engine() -> bool:
    if not on_gpu():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - a broken TE install must fall back to the local spec, not crash
        return False
    return True


# ----------------------------------------------------------------------------------------------- CPU shims


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, int):
        return True  # a bare index means a CUDA ordinal to torch
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


def _cpu_factory(fn: Callable) -> Callable:
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__wrapped__ = fn
    return factory


class _CpuCuda(types.SimpleNamespace):
    """`torch.cuda` as seen by a shimmed Megatron module: CPU RNG, no-op synchronisation."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """A module-local `torch` whose tensor factories put `device="cuda"` tensors on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        rng = types.SimpleNamespace(get_rng_state=_cpu_get_rng_state, set_rng_state=_cpu_set_rng_state)
        self.cuda = _CpuCuda(
            current_device=_cpu_current_device,
            synchronize=_noop,
            get_rng_state=_cpu_get_rng_state,
            set_rng_state=_cpu_set_rng_state,
            manual_seed=torch.manual_seed,
            manual_seed_all=torch.manual_seed,
            random=rng,
        )

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        return _cpu_factory(attr) if name in _FACTORIES else attr


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _cpu_get_rng_state(device: Any = None, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_get_cuda_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    return torch.get_rng_state()


def _tensor_cuda_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def clip_grad_by_total_norm_fp32(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Megatron's `clip_grad_by_total_norm_fp32` without its `torch.cuda.FloatTensor` assert.

    Same contract: scale every fp32 grad in place by max_norm / (total_norm + 1e-6) when that is < 1; the
    total norm itself comes from Megatron's own `get_grad_norm_fp32` (reduced over the model-parallel group).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype != torch.float32 and not use_decoupled_grad:
            raise TypeError(f"grad clipping expects fp32 main grads, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


_CUDA_TYPE_NAMES = {f"torch.{t}": f"torch.cuda.{t}" for t in ("FloatTensor", "HalfTensor", "BFloat16Tensor")}


def _with_cuda_type_names(fn: Callable) -> Callable:
    """Run `fn` with `Tensor.type()` naming CPU float tensors as their CUDA types.

    The distributed optimizer sorts parameters into fp32 / 16-bit groups by comparing `param.type()` with
    'torch.cuda.FloatTensor' etc. (and raises for anything else); the grouping is all it uses the name for.
    Only that one-time set-up runs under the renaming.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.type

        def type_name(self: torch.Tensor, *targs: Any, **tkwargs: Any) -> Any:
            if targs or tkwargs:
                return original(self, *targs, **tkwargs)
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)

        torch.Tensor.type = type_name
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    wrapper.__wrapped__ = fn
    return wrapper


def apply_moe_shims() -> None:
    """Without Transformer Engine megatron-core 0.16 leaves `moe_utils.te_general_gemm` undefined, and the MoE
    router's gating GEMM raises NameError on it; None selects its plain torch matmul. Idempotent."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply_cpu_shims() -> None:
    """Redirect Megatron-core's CUDA-only bookkeeping to the CPU. Idempotent; a no-op when CUDA is present."""
    global _shims_applied
    apply_moe_shims()
    if _shims_applied or on_gpu():
        return
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _noop
    torch.Tensor.cuda = _tensor_cuda_on_cpu  # tied-embedding sync with PP>1 calls weight.data.cuda()
    cpu_torch = _CpuTorch()
    for name in _CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = cpu_torch
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_cuda_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    distrib._build_model_and_main_param_groups = staticmethod(
        _with_cuda_type_names(distrib._build_model_and_main_param_groups)
    )
    _shims_applied = True
    logger.debug("applied Megatron-core CPU shims")


# ------------------------------------------------------------------------------------ process groups


def init_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 0,
    *,
    context_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
) -> None:
    """Initialise torch.distributed, Megatron's parallel_state and its RNG tracker.

    `context_parallel` splits every sequence over that many ranks (Megatron's CP group, carved from DP).
    `expert_parallel` / `expert_tensor_parallel` lay out MoE experts (Megatron's expert grid: ETP x EP x PP
    ranks, the rest expert-data-parallel; ETP defaults to `tensor_parallel`); dense models leave them unset.

    Under torchrun the env:// rendezvous is used; in a plain process (no RANK/WORLD_SIZE) a private
    single-rank FileStore is created, so tests and notebooks need no launcher. Safe to call again after
    `destroy_distributed()`.
    """
    global _owned_store_dir
    apply_cpu_shims()
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if on_gpu():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group(
                backend=dist_backend(), init_method="env://", timeout=timeout
            )
        else:
            if on_gpu():
                torch.cuda.set_device(0)
            _owned_store_dir = tempfile.TemporaryDirectory(prefix="m2po-store-")
            store = torch.distributed.FileStore(os.path.join(_owned_store_dir.name, "store"), 1)
            torch.distributed.init_process_group(
                backend=dist_backend(), store=store, rank=0, world_size=1, timeout=timeout
            )
    world = torch.distributed.get_world_size()
    if world % (tensor_parallel * pipeline_parallel * context_parallel) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel={tensor_parallel} x "
            f"pipeline_parallel={pipeline_parallel} x context_parallel={context_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if expert_tensor_parallel is None:
        expert_tensor_parallel = tensor_parallel
    grid = expert_tensor_parallel * expert_parallel * pipeline_parallel
    if world % grid != 0:
        raise ValueError(
            f"world size {world} is not divisible by expert_tensor_parallel={expert_tensor_parallel} x "
            f"expert_parallel={expert_parallel} x pipeline_parallel={pipeline_parallel}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    # Megatron's convention: pipeline stages draw different init streams, TP ranks are forked by the tracker.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    mp_tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def rank() -> int:
    """This process's global rank (0 outside torch.distributed)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    """The number of processes (1 outside torch.distributed)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the process group (so `init_distributed` can run again)."""
    global _owned_store_dir
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if _owned_store_dir is not None:
        _owned_store_dir.cleanup()
        _owned_store_dir = None
