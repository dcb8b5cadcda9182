"""Code that runs inside vLLM's worker process, loaded there as the worker extension (`worker_extension_cls`).

In process (`vllm.LLM`): the engine calls `stage_hf_tensors` / `apply_staged_weights` with
`LLM.collective_rpc`. Buckets are staged, then applied at once with the model runner's `reload_weights`
(in-place reload that redoes vLLM's post-load processing, e.g. the CPU GEMM weight packing that
`model.load_weights` cannot write into). Buckets travel as safetensors bytes: vLLM's RPC encoding does not
keep tensors inside lists intact.

Server (`vllm serve`): vLLM 0.32's RL routes (/start_weight_update, /update_weights,
/finish_weight_update) drive a weight-transfer backend chosen by `--weight-transfer-config`. Its built-in
backends (nccl, ipc, ...) need CUDA, so importing this module registers one more, `m2po_safetensors`: each
/update_weights carries one bucket as base64 safetensors bytes (`data`) or a safetensors file / directory
on the server's disk (`path`), loaded with the same layerwise reload the NCCL backend uses.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load, load_file
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

BACKEND = "m2po_safetensors"


class WeightUpdateExtension:
    """Mixed into vLLM's worker class by vLLM itself; `self.model_runner` is the worker's runner."""

    def stage_hf_tensors(self, payload: bytes) -> int:
        staged = getattr(self, "_m2po_staged", None)
        if staged is None:
            staged = self._m2po_staged = {}
        tensors = load(payload)
        staged.update(tensors)
        return len(tensors)

    def apply_staged_weights(self) -> int:
        staged = getattr(self, "_m2po_staged", None) or {}
        self._m2po_staged = None
        self.model_runner.reload_weights(weights_iterator=iter(staged.items()))
        return len(staged)


@dataclass
class SafetensorsInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: the tensors come inside the HTTP requests (or from the server's disk)."""


@dataclass
class SafetensorsUpdateInfo(WeightTransferUpdateInfo):
    data: str | None = None  # base64 of safetensors bytes
    path: str | None = None  # a .safetensors file, or a directory whose *.safetensors are all loaded

    def __post_init__(self):
        if (self.data is None) == (self.path is None):
            raise ValueError(f"{BACKEND} update_info needs exactly one of 'data' and 'path'")


class SafetensorsWeightTransferEngine(WeightTransferEngine[SafetensorsInitInfo, SafetensorsUpdateInfo]):
    """HF-named tensors in safetensors format, loaded with vLLM's layerwise reload (CPU or GPU)."""

    init_info_cls = SafetensorsInitInfo
    update_info_cls = SafetensorsUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: SafetensorsInitInfo) -> None:
        return None

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload  # ~10 s to import

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload  # ~10 s to import

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info) -> None:
        # the base class ends with torch.accelerator.synchronize(), which has no accelerator to wait for on CPU
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: SafetensorsUpdateInfo) -> None:
        if update_info.data is not None:
            tensors = load(base64.b64decode(update_info.data))
        else:
            where = Path(update_info.path)
            files = sorted(where.glob("*.safetensors")) if where.is_dir() else [where]
            if not files or not all(f.is_file() for f in files):
                raise ValueError(f"{BACKEND}: no safetensors file at {where}")
            tensors = {k: v for f in files for k, v in load_file(f).items()}
        self.model.load_weights([(name, t.to(self.device)) for name, t in tensors.items()])

    def shutdown(self) -> None:
        return None


try:
    WeightTransferEngineFactory.register_engine(BACKEND, SafetensorsWeightTransferEngine)
except ValueError:  # already registered in this process
    pass
