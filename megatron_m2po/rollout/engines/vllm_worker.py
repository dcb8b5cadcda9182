"""vLLM worker extension (`worker_extension_cls`): methods the engine calls on every worker with
`LLM.collective_rpc`, to put HF-named tensors into the running model.

Buckets are staged, then applied at once with the model runner's `reload_weights` (in-place reload that
redoes vLLM's post-load processing, e.g. the CPU GEMM weight packing that `model.load_weights` cannot
write into), falling back to `model.load_weights` on vLLM versions without it. Buckets travel as
safetensors bytes: vLLM's RPC encoding does not keep tensors inside lists intact.
"""

from __future__ import annotations


class WeightUpdateExtension:
    """Mixed into vLLM's worker class by vLLM itself; `self.model_runner` is the worker's runner."""

    def stage_hf_tensors(self, payload: bytes) -> int:
        from safetensors.torch import load

        staged = getattr(self, "_m2po_staged", None)
        if staged is None:
            staged = self._m2po_staged = {}
        tensors = load(payload)
        staged.update(tensors)
        return len(tensors)

    def apply_staged_weights(self) -> int:
        staged = getattr(self, "_m2po_staged", None) or {}
        self._m2po_staged = None
        runner = self.model_runner
        if hasattr(runner, "reload_weights"):
            runner.reload_weights(weights_iterator=iter(staged.items()))
        else:
            device = next(runner.model.parameters()).device
            runner.model.load_weights(weights=[(k, v.to(device)) for k, v in staged.items()])
        return len(staged)
