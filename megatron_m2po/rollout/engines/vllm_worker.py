"""vLLM worker extension (`worker_extension_cls`): methods the engine calls on every worker with
`LLM.collective_rpc`, to load HF-named tensors into the running model in place."""

from __future__ import annotations


class WeightUpdateExtension:
    """Mixed into vLLM's worker class by vLLM itself; `self.model_runner` is the worker's runner."""

    def load_hf_tensors(self, named_tensors) -> int:
        device = next(self.model_runner.model.parameters()).device
        weights = [(name, tensor.to(device)) for name, tensor in named_tensors]
        self.model_runner.model.load_weights(weights=weights)
        return len(weights)
