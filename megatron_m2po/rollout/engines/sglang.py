"""Async client of SGLang's native HTTP API (python/sglang/srt/entrypoints/http_server.py).

One SGLangEngine is one serving endpoint: a single server, or sglang-router in front of several
(`url` for generation, `worker_urls` for the control calls every server must receive: pause,
continue, flush, weight updates). Each of the n samples of a group is its own /generate request
with its own `rid`, so one can be aborted and SGLang's radix cache shares the prompt prefix.

Behaviour log-probs: SGLang returns log-probs of the temperature-scaled distribution unless the
server runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1; leave it unset so they equal
log_softmax(logits / T), the trainer's definition.

Weight sync: NCCL (sync/nccl.py drives /init_weights_update_group and
/update_weights_from_distributed while the trainer broadcasts) or files
(/update_weights_from_disk). Replies are validated; a reply that breaks the schema raises
EngineReplyError naming the endpoint and field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp

from megatron_m2po.rollout.engines.base import (
    Engine,
    EngineError,
    EngineReplyError,
    EngineRequestError,
    NamedTensors,
)
from megatron_m2po.types import Sample, SamplingParams

logger = logging.getLogger(__name__)

FINISH_TYPES = {"stop", "length", "abort"}


def sglang_sampling_params(params: SamplingParams, index: int) -> dict[str, Any]:
    """The `sampling_params` object of a /generate request for sample `index` of a group."""
    out: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        out["sampling_seed"] = params.seed + index
    return out


def _generate_payload(rid: str, prompt_ids: list[int], sampling_params: dict[str, Any]) -> dict[str, Any]:
    """Body of one non-streaming /generate request that returns per-token log-probs."""
    return {
        "rid": rid,
        "input_ids": list(prompt_ids),
        "sampling_params": sampling_params,
        "return_logprob": True,
        "stream": False,
    }


def parse_generate_reply(reply: Any, where: str) -> tuple[list[int], list[float], str, dict[str, Any]]:
    """(token ids, log-probs, finish reason, meta_info) of one /generate reply with return_logprob=True."""
    if not isinstance(reply, dict):
        raise EngineReplyError(f"{where}: expected a JSON object, got {type(reply).__name__}")
    meta = reply.get("meta_info")
    if not isinstance(meta, dict):
        raise EngineReplyError(f"{where}: field 'meta_info' missing or not an object")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise EngineReplyError(
            f"{where}: field 'meta_info.output_token_logprobs' missing or not a list "
            "(was the request sent with return_logprob=true?)"
        )
    token_ids, logprobs = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise EngineReplyError(
                f"{where}: meta_info.output_token_logprobs[{i}] must be [logprob, token_id, text]"
            )
        lp, tok = entry[0], entry[1]
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or math.isnan(lp) or lp > 1e-4:
            raise EngineReplyError(
                f"{where}: meta_info.output_token_logprobs[{i}][0] = {lp!r} is not a log-prob"
            )
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise EngineReplyError(
                f"{where}: meta_info.output_token_logprobs[{i}][1] = {tok!r} is not a token id"
            )
        token_ids.append(tok)
        logprobs.append(float(lp))
    output_ids = reply.get("output_ids")
    if isinstance(output_ids, list) and output_ids and output_ids != token_ids[-len(output_ids) :]:
        raise EngineReplyError(
            f"{where}: 'output_ids' disagree with meta_info.output_token_logprobs token ids"
        )
    finish = meta.get("finish_reason")
    if not isinstance(finish, dict) or finish.get("type") not in FINISH_TYPES:
        raise EngineReplyError(
            f"{where}: meta_info.finish_reason = {finish!r}, expected {{'type': stop|length|abort}}"
        )
    completion = meta.get("completion_tokens")
    if completion is not None and completion != len(token_ids):
        raise EngineReplyError(
            f"{where}: meta_info.completion_tokens = {completion} but {len(token_ids)} output_token_logprobs"
        )
    return token_ids, logprobs, finish["type"], meta


class SGLangEngine(Engine):
    """One SGLang endpoint. `gpus` is the number of GPUs behind it (its ranks in the NCCL update group)."""

    def __init__(
        self,
        url: str,
        *,
        worker_urls: Sequence[str] | None = None,
        engine_id: str | None = None,
        request_timeout: float = 3600.0,
        control_timeout: float = 600.0,
        gpus: int = 1,
        pause_mode: str = "in_place",
        version: int = 0,
        parallel_sampling: bool = True,
    ):
        super().__init__(engine_id or url)
        # One request with sampling_params.n (SGLang's parallel sampling: one prefill, n decodes batched on the
        # server) instead of n requests; per-sample seeds need one request each (seed + index).
        self.parallel_sampling = parallel_sampling
        self.url = url.rstrip("/")
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or [url])]
        self.request_timeout, self.control_timeout = request_timeout, control_timeout
        self.gpus = gpus
        self.pause_mode = pause_mode
        self._version = version
        self._session: aiohttp.ClientSession | None = None

    # -- HTTP helpers ---------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def _post(self, base: str, path: str, payload: dict | None, timeout: float) -> Any:
        where = f"{base}{path}"
        try:
            async with self._http().post(
                where, json=payload or {}, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                body = await r.text()
                if r.status == 400:
                    raise EngineRequestError(f"{where}: request rejected (HTTP 400): {body[:500]}")
                if r.status != 200:
                    raise EngineError(f"{where}: HTTP {r.status}: {body[:500]}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise EngineError(f"{where}: {type(e).__name__}: {e}") from e
        try:
            return json.loads(body) if body.strip() else {}
        except ValueError:
            return body  # a few control endpoints answer plain text

    async def _control(
        self, path: str, payload: dict | None = None, *, check_success: bool = False
    ) -> list[Any]:
        """POST to every worker; with check_success the reply must be {"success": true, ...}."""
        replies = await asyncio.gather(
            *(self._post(u, path, payload, self.control_timeout) for u in self.worker_urls)
        )
        if check_success:
            for url, reply in zip(self.worker_urls, replies):
                if not isinstance(reply, dict) or "success" not in reply:
                    raise EngineReplyError(f"{url}{path}: reply has no 'success' field: {str(reply)[:300]}")
                if not reply["success"]:
                    raise EngineError(f"{url}{path} failed: {reply.get('message', '')}")
        return replies

    # -- generation ------------------------------------------------------------------------------------
    async def generate(
        self, prompt_id: str, prompt_ids: list[int], n: int, params: SamplingParams
    ) -> list[Sample]:
        if n < 1 or not prompt_ids:
            raise ValueError(f"generate {prompt_id}: need n >= 1 and a non-empty prompt")
        version = self._version
        tag = uuid.uuid4().hex[:8]
        if self.parallel_sampling and params.seed is None and n > 1:
            return await self._generate_parallel(
                prompt_id, f"{prompt_id}-{tag}", prompt_ids, n, params, version
            )
        rids = [f"{prompt_id}-{i}-{tag}" for i in range(n)]
        tasks = [
            asyncio.ensure_future(self._generate_one(prompt_id, i, rids[i], prompt_ids, params, version))
            for i in range(n)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            # best effort: free the server's slots for the samples nobody will read
            asyncio.ensure_future(self._abort_quietly(rids))
            raise

    async def _generate_parallel(
        self, prompt_id: str, rid: str, prompt_ids: list[int], n: int, params: SamplingParams, version: int
    ) -> list[Sample]:
        payload = _generate_payload(rid, prompt_ids, {**sglang_sampling_params(params, 0), "n": n})
        t0 = time.perf_counter()
        try:
            reply = await self._post(self.url, "/generate", payload, self.request_timeout)
        except BaseException:
            asyncio.ensure_future(self._abort_quietly([rid]))
            raise
        elapsed = time.perf_counter() - t0
        if not isinstance(reply, list) or len(reply) != n:
            got = f"a list of {len(reply)}" if isinstance(reply, list) else type(reply).__name__
            raise EngineReplyError(
                f"{self.url}/generate rid={rid}: sampling_params.n = {n} but the reply is {got}"
            )
        return [
            self._to_sample(prompt_id, i, f"{rid}[{i}]", prompt_ids, r, version, elapsed)
            for i, r in enumerate(reply)
        ]

    async def _generate_one(
        self,
        prompt_id: str,
        index: int,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        version: int,
    ) -> Sample:
        payload = _generate_payload(rid, prompt_ids, sglang_sampling_params(params, index))
        t0 = time.perf_counter()
        reply = await self._post(self.url, "/generate", payload, self.request_timeout)
        elapsed = time.perf_counter() - t0
        if isinstance(reply, list) and len(reply) == 1:
            reply = reply[0]
        return self._to_sample(prompt_id, index, rid, prompt_ids, reply, version, elapsed)

    def _to_sample(
        self,
        prompt_id: str,
        index: int,
        rid: str,
        prompt_ids: list[int],
        reply: Any,
        version: int,
        elapsed: float,
    ) -> Sample:
        token_ids, logprobs, finish, meta = parse_generate_reply(reply, f"{self.url}/generate rid={rid}")
        token_version = version
        if meta.get("weight_version") not in (None, "", "default"):
            try:
                token_version = int(meta["weight_version"])
            except (TypeError, ValueError):
                raise EngineReplyError(
                    f"{self.url}/generate rid={rid}: meta_info.weight_version = {meta['weight_version']!r} "
                    "is not an integer version (weight updates from megatron_m2po set it to str(version))"
                ) from None
            # A response that spanned an in-place update reports the new version; its early tokens came from
            # the version it started on, so record the older one for every token (staleness over-, never
            # under-estimated).
            token_version = min(token_version, version)
        return Sample(
            prompt_id=prompt_id,
            group_index=index,
            prompt_ids=list(prompt_ids),
            response_ids=token_ids,
            behavior_logprobs=logprobs,
            versions=[token_version] * len(token_ids),
            finish_reason=finish,
            engine_id=self.engine_id,
            timings={"generate_s": elapsed},
            response_text=str(reply.get("text", "")),
        )

    async def _abort_quietly(self, rids: Sequence[str]) -> None:
        for rid in rids:
            try:
                await self._post(self.url, "/abort_request", {"rid": rid}, 10.0)
            except EngineError:
                pass

    async def abort_all(self) -> None:
        await self._control("/abort_request", {"abort_all": True, "rid": ""})

    # -- control ---------------------------------------------------------------------------------------
    async def pause(self) -> None:
        await self._control("/pause_generation", {"mode": self.pause_mode})

    async def resume(self) -> None:
        await self._control("/continue_generation", {})

    async def flush_cache(self) -> None:
        await self._control("/flush_cache", {})

    async def health(self) -> bool:
        try:
            async with self._http().get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def get_server_info(self) -> dict[str, Any]:
        try:
            async with self._http().get(
                f"{self.worker_urls[0]}/get_server_info", timeout=aiohttp.ClientTimeout(total=30)
            ) as r:
                return await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            raise EngineError(f"{self.worker_urls[0]}/get_server_info: {e}") from e

    # -- weights ---------------------------------------------------------------------------------------
    async def begin_weight_update(self, version: int) -> None:
        await self.pause()

    async def update_weights_bucket(self, named_tensors: NamedTensors) -> None:
        raise EngineError(
            f"engine {self.engine_id}: SGLang takes weights over NCCL (WeightSync(transport='nccl')) or from disk "
            "(transport='disk'), not as in-process tensors"
        )

    async def finish_weight_update(self, version: int) -> None:
        self._version = version
        await self.resume()

    async def update_weights_from_disk(self, hf_dir: str, version: int) -> None:
        await self._control(
            "/update_weights_from_disk",
            {"model_path": str(hf_dir), "weight_version": str(version), "flush_cache": True},
            check_success=True,
        )
        self._version = version

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Join the trainer's broadcast group (trainer = rank 0; this engine's GPUs start at rank_offset)."""
        if len(self.worker_urls) != 1:
            raise EngineError(
                f"engine {self.engine_id}: give each SGLang server its own SGLangEngine for NCCL sync "
                "(each needs its own rank_offset)"
            )
        await self._control(
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
            check_success=True,
        )

    async def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        version: int | None,
        group_name: str = "weight_update_group",
    ) -> None:
        """Tell the server to receive these tensors; the trainer broadcasts them on the group meanwhile."""
        payload: dict[str, Any] = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "flush_cache": True,
        }
        if version is not None:
            payload["weight_version"] = str(version)
        await self._control("/update_weights_from_distributed", payload, check_success=True)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
