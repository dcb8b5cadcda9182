"""Async client of SGLang's native HTTP API, pinned to sglang==0.5.23 (sglang/srt/entrypoints/http_server.py).

One SGLangEngine is one serving endpoint: a single server, or sglang-router (0.3.2) in front of several.
`url` takes generation; `worker_urls` (every server behind it) take the control calls, because the
router forwards generation only and answers 404 to pause / continue / abort / weight updates / the
NCCL group routes. A group of n samples is one /generate with `sampling_params.n` (SGLang's parallel
sampling: one prefill, n decodes) and no seed: SGLang honours `sampling_seed` only when the server runs
with `--enable-deterministic-inference` (and then seeds every unseeded request with 42). With
`deterministic=True` (for such a server) each sample is its own request seeded from
`rollout.seeding.request_seed(run seed, version, prompt id, index)`.

Behaviour log-probs are log_softmax(logits / T) (leave SGLANG_RETURN_ORIGINAL_LOGPROB unset). The server
reports per-token policy versions as `meta_info.weight_versions` spans; they become `Sample.versions`.

Routing replay (MoE, `routed_experts=(layers, top_k)`): each /generate asks for `return_routed_experts` from
position 0 (`routed_experts_start_len`), and the reply's `meta_info.routed_experts` (base64 of the int32 array
[prompt + response - 1, layers, top_k]) becomes `Sample.routed_experts`; the servers must run with
`--enable-return-routed-experts` (EngineLauncher adds it for MoE models).

Weight updates (0.5.23): pause (`pause_mode`, default "retract": running requests go back to the queue and
their KV is recomputed on the new weights), POST /begin_weight_update, one /update_weights_from_distributed
per bucket while the trainer broadcasts (sync/broadcast.py), /end_weight_update, /flush_cache (refused
while requests run, so never in "in_place" mode), /continue_generation. Failures are HTTP 400 with
{"success": false, "message"}: a failed update (EngineError with the server's message); for /generate a 400
stays a bad request (EngineRequestError, not retried elsewhere).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np

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

SGLANG_VERSION = "0.5.23"
SGLANG_ROUTER_VERSION = "0.3.2"
FINISH_TYPES = {"stop", "length", "abort"}
PAUSE_MODES = ("retract", "abort", "in_place")
DEFAULT_VERSION = "default"  # the server's weight_version before any update names one
# sglang-router 0.3.2's readiness route (200 once a worker is healthy, 503 before); SGLang 0.5.23 has none.
ROUTER_ONLY_ROUTE = "/readiness"
# Sent to every server directly: sglang-router 0.3.2 has none of them (404), and 0.5.23 guards them with
# --admin-api-key when one is set (ADMIN_OPTIONAL).
CONTROL_ROUTES = (
    "/abort_request",
    "/pause_generation",
    "/continue_generation",
    "/flush_cache",
    "/update_weights_from_disk",
    "/init_weights_update_group",
    "/destroy_weights_update_group",
    "/begin_weight_update",
    "/end_weight_update",
    "/update_weights_from_distributed",
)


def sglang_sampling_params(params: SamplingParams, *, n: int = 1, seed: int | None = None) -> dict[str, Any]:
    """The `sampling_params` object of one /generate request (SGLang's api_types.SamplingParams fields)."""
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
    if n > 1:
        out["n"] = n
    if seed is not None:
        out["sampling_seed"] = seed
    return out


def generate_payload(
    rid: str, prompt_ids: list[int], sampling_params: dict[str, Any], *, routed_experts: bool = False
) -> dict[str, Any]:
    """Body of one non-streaming /generate request that returns per-token log-probs (and, with
    `routed_experts`, the experts of every token the model was fed, from the first prompt token on)."""
    body = {
        "rid": rid,
        "input_ids": list(prompt_ids),
        "sampling_params": sampling_params,
        "return_logprob": True,
        "stream": False,
    }
    if routed_experts:
        body.update(return_routed_experts=True, routed_experts_start_len=0)
    return body


def parse_routed_experts(meta: dict[str, Any], tokens: int, shape: tuple[int, int], where: str) -> np.ndarray:
    """meta_info["routed_experts"] of a reply -> [tokens, layers, top_k] expert ids, as `Sample.routed_experts`.

    SGLang 0.5.23 sends the int32 array [fed tokens, layers, top_k] of positions [routed_experts_start_len,
    prompt + response - 1) as base64 of its bytes (srt/state_capturer/routed_experts.py); it sends nothing
    when the server runs without --enable-return-routed-experts."""
    layers, top_k = shape
    encoded = meta.get("routed_experts")
    if not isinstance(encoded, str):
        raise EngineReplyError(
            f"{where}: meta_info.routed_experts is {'missing' if encoded is None else type(encoded).__name__}, "
            "expected base64 of int32 expert ids (start the SGLang servers with --enable-return-routed-experts, "
            "or set algorithm.routing_replay=off)"
        )
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EngineReplyError(f"{where}: meta_info.routed_experts is not base64: {e}") from None
    expected = tokens * layers * top_k * 4
    if len(raw) != expected:
        raise EngineReplyError(
            f"{where}: meta_info.routed_experts holds {len(raw)} bytes, expected {expected} (int32 "
            f"[{tokens} tokens, {layers} layers, top_k {top_k}])"
        )
    experts = np.frombuffer(raw, dtype="<i4").reshape(tokens, layers, top_k)
    if experts.size and (experts.min() < 0 or experts.max() > np.iinfo(np.uint16).max):
        raise EngineReplyError(
            f"{where}: meta_info.routed_experts holds expert ids outside [0, 65535] "
            f"({int(experts.min())}..{int(experts.max())})"
        )
    return experts.astype(np.uint8 if experts.size == 0 or experts.max() < 256 else np.uint16)


def parse_generate_reply(reply: Any, where: str) -> tuple[list[int], list[float], str, dict[str, Any]]:
    """(token ids, log-probs, finish reason, meta_info) of one /generate reply with return_logprob=True."""
    if not isinstance(reply, dict):
        raise EngineReplyError(f"{where}: expected a JSON object, got {type(reply).__name__}")
    meta = reply.get("meta_info")
    if not isinstance(meta, dict):
        raise EngineReplyError(f"{where}: field 'meta_info' missing or not an object")
    finish = meta.get("finish_reason")
    if not isinstance(finish, dict) or finish.get("type") not in FINISH_TYPES:
        raise EngineReplyError(
            f"{where}: meta_info.finish_reason = {finish!r}, expected {{'type': stop|length|abort}}"
        )
    entries = meta.get("output_token_logprobs")
    if entries is None and finish["type"] == "abort":
        return [], [], "abort", meta  # aborted before its first token: resubmitted by the farm
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
    if output_ids is not None and output_ids != token_ids:
        raise EngineReplyError(
            f"{where}: 'output_ids' disagree with meta_info.output_token_logprobs token ids"
        )
    completion = meta.get("completion_tokens")
    if completion is not None and completion != len(token_ids):
        raise EngineReplyError(
            f"{where}: meta_info.completion_tokens = {completion} but {len(token_ids)} output_token_logprobs"
        )
    return token_ids, logprobs, finish["type"], meta


def _version_number(value: Any, start_version: int, where: str) -> int:
    if value in (None, "", DEFAULT_VERSION):
        return start_version
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EngineReplyError(
            f"{where}: weight version {value!r} is not an integer (megatron_m2po's updates send str(version))"
        ) from None


def token_versions(meta: dict[str, Any], n_tokens: int, start_version: int, where: str) -> list[int]:
    """Policy version of every output token, from meta_info.weight_versions spans [start, end).

    Without spans (a server that reports one weight_version), a response that may have spanned an update
    records the older of (version at request start, reported version) for every token: staleness over-,
    never under-estimated.
    """
    spans = meta.get("weight_versions")
    if not spans:
        reported = _version_number(
            meta.get("weight_version"), start_version, f"{where} meta_info.weight_version"
        )
        return [min(reported, start_version)] * n_tokens
    if not isinstance(spans, list):
        raise EngineReplyError(
            f"{where}: meta_info.weight_versions must be a list of {{version, start, end}}"
        )
    versions: list[int] = []
    for i, span in enumerate(spans):
        if (
            not isinstance(span, dict)
            or span.get("start") != len(versions)
            or not isinstance(span.get("end"), int)
        ):
            raise EngineReplyError(
                f"{where}: meta_info.weight_versions[{i}] = {span!r} does not continue at token {len(versions)}"
            )
        number = _version_number(
            span.get("version"), start_version, f"{where} meta_info.weight_versions[{i}]"
        )
        versions += [number] * (span["end"] - span["start"])
    if len(versions) != n_tokens:
        raise EngineReplyError(
            f"{where}: meta_info.weight_versions cover {len(versions)} tokens, the reply has {n_tokens}"
        )
    return versions


def _failure_message(body: Any) -> str:
    """The reason in an SGLang failure reply: {"success": false, "message"}, {"error": ...} or plain text."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        return str(body.get("message") or error or body)[:500]
    return str(body).strip()[:500]


class SGLangEngine(Engine):
    """One SGLang endpoint (a server, or a router with `worker_urls`); its GPUs are read from /server_info."""

    def __init__(
        self,
        url: str,
        *,
        worker_urls: Sequence[str] | None = None,
        engine_id: str | None = None,
        request_timeout: float = 3600.0,
        control_timeout: float = 600.0,
        health_timeout: float = 10.0,
        pause_mode: str = "retract",
        version: int = 0,
        deterministic: bool = False,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        routed_experts: tuple[int, int] | None = None,
    ):
        """`routed_experts` = (layers, top_k) of an MoE model: every request asks for the experts it was routed
        to and every sample carries them (`Sample.routed_experts`)."""
        super().__init__(engine_id or url)
        self.routed_experts = routed_experts
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"SGLangEngine: pause_mode must be one of {PAUSE_MODES}, got {pause_mode!r}")
        self.url = url.rstrip("/")
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or [url])]
        if not self.worker_urls:
            raise ValueError(f"SGLangEngine {self.engine_id}: worker_urls is empty")
        self.request_timeout, self.control_timeout = request_timeout, control_timeout
        self.health_timeout = health_timeout  # each health probe's bound: a hung server fails it in this time
        self.pause_mode = pause_mode
        self.deterministic = deterministic
        # Sent as "Authorization: Bearer KEY" (sglang --api-key); control routes take the admin key when set.
        self._api_key, self._admin_api_key = api_key or None, admin_api_key or None
        self._version = self._initial_version = version
        self._session: aiohttp.ClientSession | None = None
        # A server that lost our weights (restarted) must get a new update group: it has left the old one.
        self.needs_new_group = False
        self.restarts_seen = 0  # times a server was found serving other weights than ours (the farm's metric)
        self.server_info: list[dict[str, Any]] | None = None  # one per worker, read by connect()
        self._paused = False  # paused by this client: /ready answers 503 then, the server is still alive
        self._update_open = False
        self._update_error: str | None = None
        self._failed_buckets: dict[str, str] = {}  # first weight name -> why that bucket failed (this update)

    @property
    def via_router(self) -> bool:
        return self.worker_urls != [self.url]

    @property
    def tp_sizes(self) -> list[int]:
        if self.server_info is None:
            raise RuntimeError(f"engine {self.engine_id}: call `await connect()` before reading its GPUs")
        return [int(info["tp_size"]) for info in self.server_info]

    @property
    def gpus(self) -> int:
        """Ranks this endpoint takes in an NCCL update group: the sum of its servers' tp_size."""
        return sum(self.tp_sizes)

    @property
    def update_open(self) -> bool:
        """A weight-update session is open on every server (begin_weight_update succeeded)."""
        return self._update_open

    # -- HTTP helpers ---------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    def _auth_header(self, path: str) -> dict[str, str]:
        key = self._admin_api_key if path in CONTROL_ROUTES and self._admin_api_key else self._api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _request(
        self, method: str, base: str, path: str, payload: dict | None, timeout: float
    ) -> tuple[int, Any]:
        """(HTTP status, JSON body or text); transport failures raise EngineError."""
        where = f"{base}{path}"
        try:
            async with self._http().request(
                method,
                where,
                json=(payload or {}) if method == "POST" else None,
                headers=self._auth_header(path),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                status, text = r.status, await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise EngineError(f"{where}: {type(e).__name__}: {e}") from e
        try:
            return status, json.loads(text) if text.strip() else {}
        except ValueError:
            return status, text  # /flush_cache and a few others answer plain text

    async def _control_one(
        self, url: str, path: str, payload: dict | None, timeout: float | None = None
    ) -> Any:
        """One control call; any failure (400 + success false, 200 + success false, 404, ...) is an EngineError."""
        status, body = await self._request("POST", url, path, payload, timeout or self.control_timeout)
        if status == 404:
            raise EngineError(
                f"{url}{path}: HTTP 404 (sglang-router has no control routes: give the servers behind it in "
                "rollout.urls and the router in rollout.router_url)"
            )
        if status != 200 or (isinstance(body, dict) and body.get("success") is False):
            raise EngineError(f"{url}{path} failed (HTTP {status}): {_failure_message(body)}")
        return body

    async def _control(self, path: str, payload: dict | None = None) -> list[Any]:
        """POST to every server behind this endpoint; the first failure raises after all have answered."""
        replies = await asyncio.gather(
            *(self._control_one(u, path, payload) for u in self.worker_urls), return_exceptions=True
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def connect(self) -> list[dict[str, Any]]:
        """Read every server's /server_info once: tp_size (its NCCL ranks) and deterministic inference."""
        if self.server_info is not None:
            return self.server_info
        infos = []
        for url in self.worker_urls:
            status, info = await self._request("GET", url, "/server_info", None, 60.0)
            if status != 200 or not isinstance(info, dict):
                raise EngineError(f"{url}/server_info: HTTP {status}: {_failure_message(info)}")
            tp = info.get("tp_size")
            if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
                raise EngineError(
                    f"{url}/server_info: tp_size = {tp!r}; is this an SGLang {SGLANG_VERSION} server? (a router "
                    "belongs in rollout.router_url, its servers in rollout.urls)"
                )
            if bool(info.get("enable_deterministic_inference")) != self.deterministic:
                raise EngineError(
                    f"{url}: the server {'runs' if not self.deterministic else 'does not run'} with "
                    "--enable-deterministic-inference but the client has deterministic="
                    f"{self.deterministic}; set rollout.sglang_deterministic to match (a deterministic server "
                    "samples every unseeded request with seed 42; a normal one ignores sampling_seed)"
                )
            await self._refuse_router(url)
            infos.append(info)
        self.server_info = infos
        return infos

    async def _refuse_router(self, url: str) -> None:
        """sglang-router proxies /server_info to a worker, so a router listed as a server passes that check and
        fails later (404 on /ready and the control routes); /readiness is a route only the router has."""
        status, _ = await self._request("GET", url, ROUTER_ONLY_ROUTE, None, 60.0)
        if status != 404:
            raise EngineError(
                f"{url} answers {ROUTER_ONLY_ROUTE} (HTTP {status}), a route only sglang-router has: a router "
                "belongs in rollout.router_url, the servers behind it in rollout.urls"
            )

    # -- generation ------------------------------------------------------------------------------------
    async def generate(
        self, prompt_id: str, prompt_ids: list[int], n: int, params: SamplingParams
    ) -> list[Sample]:
        if n < 1 or not prompt_ids:
            raise ValueError(f"generate {prompt_id}: need n >= 1 and a non-empty prompt")
        await self.connect()
        version = self._version
        tag = uuid.uuid4().hex[:8]
        # One request per sample, each under its own rid: with n > 1 in one request SGLang 0.5.23 replaces the
        # rids with uuids (tokenizer_manager.py), so /abort_request could not reach a cancelled group's samples.
        if self.deterministic and params.seed is None:
            raise ValueError(
                f"engine {self.engine_id}: deterministic=True needs a run seed (train.seed) to derive request seeds"
            )
        rids = [f"{prompt_id}-{i}-{tag}" for i in range(n)]
        tasks = [
            asyncio.ensure_future(
                self._generate_request(
                    prompt_id,
                    rids[i],
                    prompt_ids,
                    1,
                    params,
                    version,
                    index=i,
                    seed=request_seed(params.seed, version, prompt_id, i) if self.deterministic else None,
                )
            )
            for i in range(n)
        ]
        try:
            return [s for group in await asyncio.gather(*tasks) for s in group]
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def _generate_request(
        self,
        prompt_id: str,
        rid: str,
        prompt_ids: list[int],
        n: int,
        params: SamplingParams,
        version: int,
        *,
        index: int = 0,
        seed: int | None = None,
    ) -> list[Sample]:
        """One /generate request for n samples (indices index .. index + n - 1)."""
        payload = generate_payload(
            rid,
            prompt_ids,
            sglang_sampling_params(params, n=n, seed=seed),
            routed_experts=self.routed_experts is not None,
        )
        where = f"{self.url}/generate rid={rid}"
        t0 = time.perf_counter()
        try:
            status, reply = await self._request("POST", self.url, "/generate", payload, self.request_timeout)
        except BaseException:
            asyncio.ensure_future(self._abort_quietly(rid))  # free the server's slots nobody will read
            raise
        elapsed = time.perf_counter() - t0
        if status == 400:
            raise EngineRequestError(f"{where}: request rejected (HTTP 400): {_failure_message(reply)}")
        if status != 200:
            raise EngineError(f"{where}: HTTP {status}: {_failure_message(reply)}")
        replies = reply if isinstance(reply, list) else [reply]
        if len(replies) != n:
            raise EngineReplyError(
                f"{where}: sampling_params.n = {n} but the reply holds {len(replies)} results"
            )
        return [
            self._to_sample(
                prompt_id, index + i, f"{where}[{i}]" if n > 1 else where, prompt_ids, r, version, elapsed
            )
            for i, r in enumerate(replies)
        ]

    def _to_sample(
        self,
        prompt_id: str,
        index: int,
        where: str,
        prompt_ids: list[int],
        reply: Any,
        version: int,
        elapsed: float,
    ) -> Sample:
        token_ids, logprobs, finish, meta = parse_generate_reply(reply, where)
        routed = None
        # an aborted sample is resubmitted by the farm: its routing, if any, is not needed
        if self.routed_experts is not None and token_ids and (finish != "abort" or "routed_experts" in meta):
            fed = len(prompt_ids) + len(token_ids) - 1
            routed = parse_routed_experts(meta, fed, self.routed_experts, where)
        return Sample(
            prompt_id=prompt_id,
            group_index=index,
            prompt_ids=list(prompt_ids),
            response_ids=token_ids,
            behavior_logprobs=logprobs,
            versions=token_versions(meta, len(token_ids), version, where),
            finish_reason=finish,
            engine_id=self.engine_id,
            timings={"generate_s": elapsed},
            response_text=str(reply.get("text", "")),
            routed_experts=routed,
        )

    async def _abort_quietly(self, rid: str) -> None:
        """Best effort: the servers (not the router, which has no abort route) drop this request."""
        await asyncio.gather(
            *(self._control_one(u, "/abort_request", {"rid": rid}, 10.0) for u in self.worker_urls),
            return_exceptions=True,
        )

    async def abort_all(self) -> None:
        await self._control("/abort_request", {"abort_all": True})

    # -- control ---------------------------------------------------------------------------------------
    async def pause(self) -> None:
        await self._control("/pause_generation", {"mode": self.pause_mode})
        self._paused = True

    async def resume(self) -> None:
        await self._control("/continue_generation", {})
        self._paused = False

    async def flush_cache(self) -> None:
        """Drop the prefix cache; SGLang refuses (400) while requests run, so only while paused (not in_place)."""
        await self._control("/flush_cache", None)

    async def health(self) -> bool:
        """Cheap and pause-aware: GET /ready on every server (503 while paused), /model_info when we paused it.

        Not /health: in 0.5.23 it runs a one-token generation and fails while generation is paused.
        """
        try:
            checks = [self._server_alive(u) for u in self.worker_urls]
            if self.via_router:  # the router's /health is liveness only; /readiness checks its workers
                checks.append(self._get_ok(self.url, ROUTER_ONLY_ROUTE))
            return all(await asyncio.gather(*checks))
        except (EngineError, asyncio.TimeoutError):
            return False

    async def _get_ok(self, url: str, path: str) -> bool:
        status, _ = await self._request("GET", url, path, None, self.health_timeout)
        return status == 200

    async def _server_alive(self, url: str) -> bool:
        if not await self._get_ok(url, "/ready") and not (self._paused or self._update_open):
            return False
        return await self._check_served_version(url)

    async def _check_served_version(self, url: str) -> bool:
        """GET /model_info (cheap, answers while paused); False when the server does not answer.

        Outside an update the served weight_version must be ours; otherwise the server was restarted (it
        serves its start-up weights): this engine takes the version the server serves, so the farm stops
        routing to it until the next update, which gives it a new update group first.
        """
        status, info = await self._request("GET", url, "/model_info", None, self.health_timeout)
        if status != 200 or not isinstance(info, dict):
            return False
        reported = info.get("weight_version")
        if self._paused or self._update_open or reported is None:
            return True
        try:
            served = self._initial_version if reported == DEFAULT_VERSION else int(reported)
        except (TypeError, ValueError):
            return True  # not a version this client set: nothing to compare
        if served != self._version:
            logger.warning(
                "engine %s: %s serves weight version %r, expected v%d (restarted?); out of rotation until it "
                "holds the farm's version (loaded from disk, or the next update, which rebuilds its update group)",
                self.engine_id,
                url,
                reported,
                self._version,
            )
            self._version, self.needs_new_group = served, True
            self.restarts_seen += 1
        return True

    # -- weights ---------------------------------------------------------------------------------------
    async def begin_weight_update(self, version: int) -> None:
        """Pause, then open the update session on every server (0.5.21+ refuses updates outside one)."""
        self._update_error = None
        self._failed_buckets = {}
        # closed until this session opens: a stale flag would make the engine a broadcast receiver
        self._update_open = False
        # a server restarted since the last health check has left the update group: notice it now
        await asyncio.gather(*(self._check_served_version(u) for u in self.worker_urls))
        await self.pause()
        replies = await asyncio.gather(
            *(self._begin_session(u) for u in self.worker_urls), return_exceptions=True
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        self._update_open = True

    async def _begin_session(self, url: str) -> None:
        """Open the update session on one server, closing a stale one left by an interrupted update (its end
        may fail: an incomplete session is discarded, which is what it is closed for)."""
        try:
            await self._control_one(url, "/begin_weight_update", {})
        except EngineError as e:
            if "already open" not in str(e):
                raise
            logger.warning("engine %s: %s; closing the stale session", self.engine_id, e)
            try:
                await self._control_one(url, "/end_weight_update", {})
            except EngineError as stale:
                logger.warning("engine %s: the stale session ended with: %s", self.engine_id, stale)
            await self._control_one(url, "/begin_weight_update", {})

    async def update_weights_bucket(self, named_tensors: NamedTensors) -> None:
        raise EngineError(
            f"engine {self.engine_id}: SGLang takes weights over NCCL (WeightSync(transport='distributed')) or "
            "from disk (transport='disk'), not as in-process tensors"
        )

    async def finish_weight_update(self, version: int) -> None:
        """Close the session, flush the prefix cache (its KV came from the old weights), resume.

        The version advances only when every bucket loaded; otherwise the EngineError names the server's
        message and the farm keeps this engine out of rotation until a later update reaches it.
        """
        errors = ([self._update_error] if self._update_error else []) + list(self._failed_buckets.values())
        if not self._update_open:
            errors.append("no weight-update session was open (begin_weight_update failed)")
        else:
            try:
                await self._control("/end_weight_update", {})
            except EngineError as e:
                errors.append(str(e))
            self._update_open = False
            if not errors and self.pause_mode != "in_place":
                try:
                    await self.flush_cache()
                except EngineError as e:
                    errors.append(str(e))
        await self.resume()
        self._update_error, self._failed_buckets = None, {}
        if errors:
            raise EngineError(
                f"engine {self.engine_id}: weight update to v{version} failed: {'; '.join(errors)}"
            )
        self._version = version

    async def discard_weight_update(self, reason: str) -> None:
        """SGLang has no route to drop a session: it is closed as failed, so the version stays and the farm
        keeps this engine out of rotation until a complete update reaches it."""
        self._update_error = self._update_error or f"the sender gave the update up: {reason}"
        await self.finish_weight_update(self.version)

    async def update_weights_from_disk(self, hf_dir: str, version: int) -> None:
        """Every server loads the HF dir while paused; the cache is flushed unless requests stay in place."""
        # a server restarted since the last health check is counted (restarts_seen) before the load hides it
        await asyncio.gather(*(self._check_served_version(u) for u in self.worker_urls))
        await self.pause()
        try:
            await self._control(
                "/update_weights_from_disk",
                {
                    "model_path": str(hf_dir),
                    "weight_version": str(version),
                    "flush_cache": self.pause_mode != "in_place",
                },
            )
        finally:
            await self.resume()
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
        """Join the trainer's broadcast group: server i takes ranks from rank_offset + sum(tp of servers < i)."""
        infos = await self.connect()
        for url, info in zip(self.worker_urls, infos):
            if info.get("dp_size", 1) != 1 or info.get("pp_size", 1) != 1:
                raise EngineError(
                    f"{url}: dp_size = {info.get('dp_size')}, pp_size = {info.get('pp_size')}; SGLang joins an "
                    "update group with tp ranks only (start one server per replica, pp_size 1)"
                )
        offsets = [rank_offset + sum(self.tp_sizes[:i]) for i in range(len(self.worker_urls))]
        await asyncio.gather(
            *(
                self._control_one(
                    url,
                    "/init_weights_update_group",
                    {
                        "master_address": master_address,
                        "master_port": master_port,
                        "rank_offset": offset,
                        "world_size": world_size,
                        "group_name": group_name,
                        "backend": backend,
                    },
                )
                for url, offset in zip(self.worker_urls, offsets)
            )
        )

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        await self._control("/destroy_weights_update_group", {"group_name": group_name})

    async def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        version: int | None,
        group_name: str = "weight_update_group",
    ) -> None:
        """Receive one bucket by broadcast (the trainer sends meanwhile). A failure is remembered and
        reported by finish_weight_update, after the session is closed and the engine resumed, unless the same
        bucket arrives later (the trainer sends it again on a rebuilt group after a broadcast broke)."""
        if not self._update_open:
            raise EngineError(f"engine {self.engine_id}: update_weights_from_distributed outside a session")
        payload: dict[str, Any] = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "flush_cache": False,  # once, in finish_weight_update, after the last bucket
        }
        if version is not None:
            payload["weight_version"] = str(version)
        try:
            await self._control("/update_weights_from_distributed", payload)
        except EngineError as e:
            self._failed_buckets.setdefault(names[0] if names else "", str(e))
            raise
        self._failed_buckets.pop(names[0] if names else "", None)  # sent again after a broken broadcast

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
