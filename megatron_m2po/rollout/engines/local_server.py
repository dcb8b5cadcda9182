"""Serve a LocalEngine over the subset of SGLang's native HTTP API that the SGLang client uses.

Two uses: a CPU farm of engine processes (each its own Python process and core, killable on its
own) behind the same client code the GPU farm uses, and the reference server the SGLang client is
tested against, with real tokens and log-probs. It behaves as the pinned sglang 0.5.23 does
(sglang/srt/entrypoints/http_server.py, managers/scheduler_components/weight_updater.py,
utils/auth.py, sampling/sampling_params.py) on what the client depends on:

- failures are HTTP 400: `{"success": false, "message": ...}` on control routes,
  `{"error": {"message": ...}}` on /generate; a bad field is named in the message;
- `/update_weights_from_distributed` is refused outside a `/begin_weight_update` ...
  `/end_weight_update` session (and then does not join the broadcast); with `flush_cache`
  (the default) while requests are in flight the update loads but answers 400 "the cache was
  not flushed", and `/flush_cache` answers 400 while requests are in flight;
- `/health` is cheap and answers during pause and weight updates (SGLang's with
  SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, which the launcher sets); `/health_generate`
  answers 503 while paused or updating, as SGLang's one-token probe would; `/ready` answers
  503 while paused;
- `/server_info` reports `tp_size` (`/get_server_info` is its deprecated alias), `/model_info`
  the served `weight_version`;
- with `--api-key` every route except /health* needs `Authorization: Bearer KEY` (401
  otherwise); with `--admin-api-key` the control routes need that key instead (SGLang's
  ADMIN_OPTIONAL routes). Binding beyond loopback without a key is refused.

Beyond SGLang, `n` and `max_new_tokens` are capped by `--max-n` / `--max-new-tokens` (400 above); a
`rid` already in flight is refused (400), so /abort_request reaches the request it names; every weight
update is staged and published whole or not at all: a shard that fails to load, a bucket that fails
(unknown name, wrong shape), a broadcast that breaks off or a session ended before every weight of the
model arrived discards the update, so the engine keeps serving the old weights and version. The limits of server_limits.py hold against slow, many or large
clients (http_guard.py): request head and body deadlines, a connection cap, a body cap; bodies over
64 KiB are parsed and weight files read off the event loop, so /health keeps answering. One update
group forms at a time, in its own thread, for at most --rendezvous-timeout seconds.

    python -m megatron_m2po.rollout.engines.local_server --model HF_DIR --port 30000 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import ipaddress
import json
import logging
import math
import os
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from aiohttp import web

from megatron_m2po.rollout.engines import server_limits
from megatron_m2po.rollout.engines.http_guard import GuardedTCPSite, limit_log_rate
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.engines.server_limits import ServerLimits
from megatron_m2po.rollout.engines.sglang import CONTROL_ROUTES
from megatron_m2po.sync.process_group import bind_gloo_to, broadcast_from_trainer, new_weight_update_group
from megatron_m2po.types import SamplingParams

logger = logging.getLogger(__name__)

_SAMPLING_KEYS = {
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "stop_token_ids",
    "sampling_seed",
    "n",
    "skip_special_tokens",
    "no_stop_trim",
    "stop",
    "min_new_tokens",
}
_SAMPLING_EPS = 1e-6  # sglang: 0 <= temperature < 1e-6 is greedy
INLINE_PARSE_BYTES = 64 << 10  # larger bodies are parsed in a worker thread
LARGE_BODIES_AT_ONCE = 4  # bodies over INLINE_PARSE_BYTES read and parsed together (bounds their memory)
NOT_FLUSHED = (
    "Weights were updated, but the cache was not flushed because requests are still running or queued. "
    "Retract or finish them, then call /flush_cache."
)


class _BadRequest(Exception):
    pass


def _int(d: dict, key: str, default: int, where: str) -> int:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _BadRequest(f"{where}.{key} must be an integer, got {type(v).__name__} {v!r}")
    return v


def _float(d: dict, key: str, default: float, where: str) -> float:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _BadRequest(f"{where}.{key} must be a number, got {type(v).__name__} {_short(v)}")
    try:
        return float(v)
    except OverflowError as e:
        raise _BadRequest(
            f"{where}.{key} must be a number in float range, got an integer of {len(str(v))} digits"
        ) from e


def _short(v: Any, limit: int = 80) -> str:
    """repr(v) cut to `limit` characters: a reply never echoes a huge value."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_json(raw: bytes, where: str) -> Any:
    """The body as JSON, or a _BadRequest saying why not (bad syntax or UTF-8, too deep, too many digits)."""
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digits over sys.get_int_max_str_digits
        raise _BadRequest(f"{where}: the body is not JSON ({_short(str(e), 200)})") from e
    except RecursionError as e:
        raise _BadRequest(f"{where}: the body is not JSON this server reads (nested too deeply)") from e


def _object(body: Any, where: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise _BadRequest(f"{where}: the body must be a JSON object, got {type(body).__name__}")
    return body


def parse_sampling(d: Any, *, vocab: int, max_n: int, max_new_cap: int) -> tuple[SamplingParams, int]:
    """SGLang's sampling-parameter checks (SamplingParams.verify) plus this server's caps; errors name the field."""
    d = _object(d, "sampling_params")
    unknown = set(d) - _SAMPLING_KEYS
    if unknown:
        raise _BadRequest(f"unsupported sampling_params {sorted(unknown)}")
    w = "sampling_params"
    temperature = _float(d, "temperature", 1.0, w)
    top_p = _float(d, "top_p", 1.0, w)
    top_k = _int(d, "top_k", -1, w)
    max_new = _int(d, "max_new_tokens", min(128, max_new_cap), w)  # sglang defaults to 128
    min_new = _int(d, "min_new_tokens", 0, w)
    n = _int(d, "n", 1, w)
    seed = d.get("sampling_seed")
    if not math.isfinite(temperature) or temperature < 0:
        raise _BadRequest(f"{w}.temperature must be a non-negative finite number, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise _BadRequest(f"{w}.top_p must be in (0, 1], got {top_p}")
    if top_k != -1 and top_k < 1:
        raise _BadRequest(f"{w}.top_k must be -1 (disable) or at least 1, got {top_k}")
    if not 0 <= max_new <= max_new_cap:
        raise _BadRequest(
            f"{w}.max_new_tokens must be in [0, {max_new_cap}] (--max-new-tokens), got {max_new}"
        )
    if not 0 <= min_new <= max_new:
        raise _BadRequest(f"{w}.min_new_tokens must be in [0, max_new_tokens({max_new})], got {min_new}")
    if not 1 <= n <= max_n:
        raise _BadRequest(f"{w}.n must be in [1, {max_n}] (--max-n), got {n}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _BadRequest(f"{w}.sampling_seed must be an integer, got {type(seed).__name__} {_short(seed)}")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise _BadRequest(f"{w}.sampling_seed must be in [-2**63, 2**63 - 1], got {_short(seed)}")
    stop = d.get("stop_token_ids") or []
    if not isinstance(stop, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop):
        raise _BadRequest(f"{w}.stop_token_ids must be a list of token ids, got {_short(stop)}")
    if any(not 0 <= t < vocab for t in stop):
        raise _BadRequest(f"{w}.stop_token_ids must be in [0, {vocab}), got {_short(stop)}")
    if temperature < _SAMPLING_EPS:  # greedy, as sglang; the engine's T = 0 is greedy
        temperature = 0.0
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=stop,
        seed=seed,
    )
    return params, n


def _version_spans(versions: list[int]) -> list[dict[str, Any]]:
    """sglang 0.5.19+'s meta_info.weight_versions: [{version, start, end}) runs over the output tokens."""
    spans: list[dict[str, Any]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == str(v):
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": str(v), "start": i, "end": i + 1})
    return spans


def _fail(message: str, status: int = 400) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=status)


def _error(request: web.Request, message: str, status: int = 400) -> web.Response:
    """The failure reply in the route's shape: sglang's /generate error object, or a control route's."""
    if request.path == "/generate":
        return web.json_response({"error": {"message": message}}, status=status)
    return _fail(message, status)


def _bearer_ok(header: str | None, key: str) -> bool:
    """aiohttp keeps a header's non-UTF-8 bytes as surrogate escapes: they encode back, and never match."""
    scheme, _, token = (header or "").partition(" ")
    try:
        token_bytes = token.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return scheme.lower() == "bearer" and secrets.compare_digest(token_bytes, key.encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalSGLangServer:
    """aiohttp app around one LocalEngine; `inflight` maps rid -> task so /abort_request can cancel it.
    Serve it with `start(host, port)`, which puts the connections behind `limits` (http_guard.py)."""

    def __init__(
        self,
        engine: LocalEngine,
        *,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        max_n: int = 64,
        max_new_tokens: int | None = None,
        limits: ServerLimits | None = None,
    ):
        self.engine = engine
        self.api_key, self.admin_api_key = api_key or None, admin_api_key or None
        self.max_n = max_n
        self.limits = limits or ServerLimits()
        self.context_len = int(getattr(engine.model.config, "max_position_embeddings", 1 << 30))
        self.max_new_tokens = min(max_new_tokens or self.context_len, self.context_len)
        self.inflight: dict[str, asyncio.Task] = {}
        self.update_groups: dict[str, Any] = {}
        self.forming: str | None = None  # the update group being formed (one at a time)
        self.session: dict[str, Any] | None = None  # the open weight-update session
        self.loading_from_disk = False
        self.pause_mode: str | None = None  # while paused
        self.guard = None  # the ConnectionGuard, once start() serves
        # Own threads, so neither big bodies nor a rendezvous take the default executor the engine's
        # pause and update calls run in.
        self._parse_pool = ThreadPoolExecutor(2, thread_name_prefix="body-parse")
        self._group_pool = ThreadPoolExecutor(1, thread_name_prefix="update-group")
        self._receive_pool = ThreadPoolExecutor(1, thread_name_prefix="update-receive")
        self._large_bodies = asyncio.Semaphore(LARGE_BODIES_AT_ONCE)
        self.app = web.Application(
            client_max_size=self.limits.max_body_bytes,
            middlewares=[self._track, self._auth, self._errors, self._read_body],
        )
        self.app.on_cleanup.append(self._shutdown_pools)
        r = self.app.router
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        r.add_get("/ready", self.ready)
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self.model_info)
        for path in ("/server_info", "/get_server_info"):  # /get_server_info: deprecated in 0.5.23
            r.add_get(path, self.server_info)
        r.add_post("/generate", self.generate)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/flush_cache", self.flush_cache)
        r.add_get("/flush_cache", self.flush_cache)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_post("/init_weights_update_group", self.init_weights_update_group)
        r.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)
        r.add_post("/begin_weight_update", self.begin_weight_update)
        r.add_post("/end_weight_update", self.end_weight_update)
        r.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)

    async def start(self, host: str, port: int) -> web.AppRunner:
        """Serve on host:port with the connection guard; returns the runner (`await runner.cleanup()` stops)."""
        runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=self.limits.idle_timeout_s)
        await runner.setup()
        guard = {
            "max_connections": self.limits.connection_cap,
            "header_timeout_s": self.limits.header_timeout_s,
        }
        site = GuardedTCPSite(runner, host, port, guard)
        await site.start()
        self.guard = site.guard
        return runner

    async def _shutdown_pools(self, app: web.Application) -> None:
        self._parse_pool.shutdown(wait=False, cancel_futures=True)
        self._group_pool.shutdown(wait=False, cancel_futures=True)
        self._receive_pool.shutdown(wait=False, cancel_futures=True)

    # -- middleware ------------------------------------------------------------------------------------
    @web.middleware
    async def _track(self, request: web.Request, handler):
        """The request head is in: its connection's head deadline is off until the response is out."""
        if self.guard is not None:
            self.guard.request_started(request.transport)
        try:
            return await handler(request)
        finally:
            if self.guard is not None:
                self.guard.request_finished(request.transport)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """sglang utils/auth.py decide_request_auth: /health* open; control routes take the admin key if set."""
        path = request.path
        if request.method == "OPTIONS" or path.startswith(("/health", "/ready", "/metrics")):
            return await handler(request)
        key = self.api_key
        if path in CONTROL_ROUTES and self.admin_api_key:  # sglang's ADMIN_OPTIONAL routes
            key = self.admin_api_key
        if key and not _bearer_ok(request.headers.get("Authorization"), key):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """A malformed request is a 400 naming what is wrong, never a 500."""
        try:
            return await handler(request)
        except _BadRequest as e:
            return _error(request, str(e))

    @web.middleware
    async def _read_body(self, request: web.Request, handler):
        """Read and parse the body before the handler: 413 above --max-body-mb (by Content-Length, before
        reading), 408 past --body-timeout, bodies over INLINE_PARSE_BYTES parsed in a worker thread."""
        request["json"] = None
        if not request.body_exists:
            return await handler(request)
        limit = self.limits.max_body_bytes
        size = request.content_length
        if size is not None and size > limit:
            return self._too_large(request, f" ({size} bytes)")
        large = size is None or size > INLINE_PARSE_BYTES
        async with self._large_bodies if large else contextlib.nullcontext():
            try:
                async with asyncio.timeout(self.limits.body_timeout_s):
                    raw = await request.read()
            except TimeoutError:
                timeout = self.limits.body_timeout_s
                reply = _error(request, f"the body did not arrive within {timeout:g}s (--body-timeout)", 408)
                reply.force_close()
                return reply
            except web.HTTPRequestEntityTooLarge:
                return self._too_large(request, "")
            if len(raw) > INLINE_PARSE_BYTES:
                loop = asyncio.get_running_loop()
                request["json"] = await loop.run_in_executor(self._parse_pool, parse_json, raw, request.path)
            else:
                request["json"] = parse_json(raw, request.path)
        return await handler(request)

    def _too_large(self, request: web.Request, size: str) -> web.Response:
        limit = self.limits.max_body_bytes
        message = (
            f"{request.path}: the body{size} is larger than this server takes ({limit} bytes, --max-body-mb)"
        )
        reply = _error(request, message, 413)
        reply.force_close()  # the rest of the body is not read
        return reply

    async def _body(self, request: web.Request) -> dict:
        return _object(request.get("json"), request.path)

    def _running(self) -> int:
        """Requests that keep a flush from running: sglang's is_fully_idle(ignore_waiting=paused), where a
        retract (or abort) pause moves them to the waiting queue and only an in_place pause keeps them running."""
        if self.pause_mode in ("retract", "abort"):
            return 0
        return sum(not t.done() for t in self.inflight.values())

    # -- info ------------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self.engine.health() else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        """sglang's one-token probe gets no answer while paused or updating weights: 503 then."""
        ok = await self.engine.health() and not self.engine.paused and self.session is None
        return web.Response(status=200 if ok else 503)

    async def ready(self, request: web.Request) -> web.Response:
        """sglang's /ready: should this server receive new requests (not paused)."""
        return web.Response(status=200 if await self.engine.health() and not self.engine.paused else 503)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": str(self.engine.hf_dir),
                "is_generation": True,
                "weight_version": str(self.engine.version),
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": str(self.engine.hf_dir),
                "tp_size": 1,
                "dp_size": 1,
                "context_length": self.context_len,
                "max_n": self.max_n,
                "max_new_tokens": self.max_new_tokens,
                "weight_version": str(self.engine.version),
                "version": "megatron_m2po.local_server",
                "pid": os.getpid(),
            }
        )

    # -- generation ------------------------------------------------------------------------------------
    def _parse_generate(self, body: Any) -> tuple[list[int], SamplingParams, int]:
        body = _object(body, "/generate")
        input_ids = body.get("input_ids")
        if not isinstance(input_ids, list) or not input_ids:
            raise _BadRequest(
                "input_ids must be one non-empty list of token ids (batches are not served here)"
            )
        if len(input_ids) >= self.context_len:  # before the per-token checks, which run on the event loop
            raise _BadRequest(
                f"The input ({len(input_ids)} tokens) is longer than the model's context length "
                f"({self.context_len} tokens)."
            )
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            raise _BadRequest(
                "input_ids must be one non-empty list of token ids (batches are not served here)"
            )
        vocab = self.engine.model.config.vocab_size
        if not all(0 <= t < vocab for t in input_ids):
            raise _BadRequest(f"input_ids must be in [0, {vocab})")
        params, n = parse_sampling(
            body.get("sampling_params"), vocab=vocab, max_n=self.max_n, max_new_cap=self.max_new_tokens
        )
        if len(input_ids) + params.max_new_tokens > self.context_len:
            raise _BadRequest(
                f"Requested token count exceeds the model's maximum context length of {self.context_len} tokens: "
                f"{len(input_ids)} input tokens + sampling_params.max_new_tokens {params.max_new_tokens}."
            )
        rid = body.get("rid")
        if rid is not None and not isinstance(rid, str):
            raise _BadRequest(f"rid must be a string, got {type(rid).__name__}")
        return input_ids, params, n

    async def generate(self, request: web.Request) -> web.Response:
        """As SGLang 0.5.23: with n > 1 the rid is expanded to rid_0 .. rid_{n-1} (io_struct.py,
        GenerateReqInput._normalize_rid) and each sample then gets a fresh uuid rid (tokenizer_manager.py), so
        /abort_request with the client's rid reaches none of them; the reply is a list of n results, an
        aborted one too (a normal 200 per sample)."""
        body = request["json"]
        input_ids, params, n = self._parse_generate(body)
        rid = str(body.get("rid") or os.urandom(8).hex())
        if n == 1 and rid in self.inflight:  # abort by rid must reach one request
            raise _BadRequest(f"rid {_short(rid)} is already in flight; a rid names one request at a time")
        rids = [rid] if n == 1 else [uuid.uuid4().hex for _ in range(n)]
        return_logprob = bool(body.get("return_logprob", False))
        routed_from = self._routed_experts_start(body, input_ids)
        task = asyncio.ensure_future(self.engine.generate(rid, input_ids, n, params))
        for r in rids:
            self.inflight[r] = task
        try:
            samples = await task
        except asyncio.CancelledError:
            if request.transport is None or request.transport.is_closing():
                raise
            aborted = [self._reply(r, input_ids, [], [], [], "abort", return_logprob) for r in rids]
            return web.json_response(aborted[0] if n == 1 else aborted)
        except ValueError as e:
            raise _BadRequest(str(e)) from e
        finally:
            for r in rids:
                self.inflight.pop(r, None)
        replies = [
            self._reply(
                rids[s.group_index],
                input_ids,
                s.response_ids,
                s.behavior_logprobs,
                s.versions,
                s.finish_reason,
                return_logprob,
                s.response_text,
                routed=None if routed_from is None else _routed_base64(s.routed_experts, routed_from),
            )
            for s in samples
        ]
        return web.json_response(replies[0] if n == 1 else replies)

    @staticmethod
    def _routed_experts_start(body: dict, input_ids: list[int]) -> int | None:
        """The first position whose routing the reply carries, when the request asks for it (as 0.5.23's
        scheduler: routed_experts_start_len in [0, prompt tokens])."""
        if body.get("return_routed_experts") is not True:
            return None
        start = body.get("routed_experts_start_len", 0)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(input_ids):
            raise _BadRequest(
                f"routed_experts_start_len must be an integer in [0, {len(input_ids)}] (the input tokens), "
                f"got {_short(repr(start))}"
            )
        return start

    def _reply(
        self, rid, input_ids, tokens, logprobs, versions, finish, return_logprob, text="", routed=None
    ) -> dict:
        reason: dict[str, Any] = {"type": finish}
        if finish == "stop" and tokens:
            reason["matched"] = tokens[-1]
        elif finish == "length":
            reason["length"] = len(tokens)
        elif finish == "abort":
            reason["message"] = "aborted"
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": reason,
            "prompt_tokens": len(input_ids),
            "completion_tokens": len(tokens),
            "cached_tokens": 0,
            "weight_version": str(self.engine.version),
            "weight_versions": _version_spans(versions),
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(logprobs, tokens)]
        if routed is not None:
            meta["routed_experts"] = routed
        return {"text": text, "output_ids": list(tokens), "meta_info": meta}

    # -- control ---------------------------------------------------------------------------------------
    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        rid = body.get("rid", "")
        if not isinstance(rid, str):
            raise _BadRequest(f"/abort_request: rid must be a string, got {type(rid).__name__}")
        targets = list(self.inflight) if body.get("abort_all") is True else [rid]
        for r in targets:
            task = self.inflight.get(r)
            if task is not None:
                task.cancel()
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        mode = (await self._body(request)).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise _BadRequest(f"/pause_generation: mode must be abort, retract or in_place, got {mode!r}")
        if mode == "abort":
            for task in list(self.inflight.values()):
                task.cancel()
        await self.engine.pause()
        self.pause_mode = mode
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await self.engine.resume()
        self.pause_mode = None
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self._running():  # sglang's scheduler flushes only when fully idle
            return web.Response(text="Flush cache failed.\n", status=400)
        return web.Response(text="Cache flushed.\n", status=200)

    # -- weights ---------------------------------------------------------------------------------------
    def _version(self, body: dict, default: int) -> int:
        """weight_version: an integer or its decimal string (SGLang's is a string) in [0, 2**63)."""
        v = body.get("weight_version")
        if v in (None, ""):
            return default
        if isinstance(v, str) and v.strip().isdigit() and len(v) < 20:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise _BadRequest(f"weight_version must be an integer version in [0, 2**63), got {_short(v)}")
        return v

    def _flushed(self, body: dict, message: str) -> web.Response:
        """sglang's flush_cache_after_weight_update: loaded, but 400 when a requested flush cannot run."""
        if body.get("flush_cache", True) and self._running():
            return _fail(NOT_FLUSHED)
        return web.json_response({"success": True, "message": message})

    def _update_busy(self) -> str | None:
        """Why a weight update cannot start now, if it cannot: one update at a time, whatever its path."""
        if self.session is not None:
            return "a weight-update session is open; call end_weight_update() first"
        if self.loading_from_disk:
            return "an update from disk is loading; wait for its reply"
        return None

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise _BadRequest("/update_weights_from_disk: model_path must be a non-empty string")
        version = self._version(body, self.engine.version + 1)
        busy = self._update_busy()
        if busy:
            return _fail(busy)
        self.loading_from_disk = True
        try:
            await self.engine.update_weights_from_disk(path, version)
        except Exception as e:  # noqa: BLE001 (any load failure is the caller's 400, as in sglang)
            return web.json_response(
                {"success": False, "message": f"{type(e).__name__}: {e}", "num_paused_requests": 0},
                status=400,
            )
        finally:
            self.loading_from_disk = False
        reply = self._flushed(body, "Succeeded to update model weights.")
        if reply.status == 200:
            return web.json_response(
                {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
            )
        return reply

    def _group_request(self, body: dict) -> dict[str, Any]:
        """The fields of /init_weights_update_group, checked: this server receives, so it is never rank 0
        (the trainer's, which hosts the rendezvous); each bad field is named."""
        where = "/init_weights_update_group"
        address, name = body.get("master_address"), body.get("group_name", "weight_update_group")
        if not isinstance(address, str) or not address:
            raise _BadRequest(f"{where}: master_address must be a host name or address")
        if not isinstance(name, str) or not name:
            raise _BadRequest(f"{where}: group_name must be a non-empty string")
        port = _int(body, "master_port", 0, where)
        world = _int(body, "world_size", 0, where)
        rank = _int(body, "rank_offset", 0, where)
        if not 1 <= port <= 65535:
            raise _BadRequest(f"{where}.master_port must be in [1, 65535], got {port}")
        if not 2 <= world <= 1 << 16:
            raise _BadRequest(f"{where}.world_size must be in [2, 65536], got {world}")
        if not 1 <= rank < world:
            raise _BadRequest(
                f"{where}.rank_offset must be in [1, world_size) = [1, {world}): rank 0 is the trainer, "
                f"which broadcasts, got {rank}"
            )
        backend = body.get("backend", "gloo")
        if backend not in ("gloo", "nccl"):
            raise _BadRequest(f"{where}.backend must be gloo or nccl, got {_short(backend)}")
        return {
            "address": address,
            "port": port,
            "rank": rank,
            "world": world,
            "name": name,
            "backend": backend,
        }

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """Join the trainer's weight-update group as rank `rank_offset` (gloo here; SGLang uses NCCL). One
        group forms at a time, in this server's own thread, for at most --rendezvous-timeout seconds."""
        g = self._group_request(await self._body(request))
        if self.forming is not None:
            return _fail(f"Failed to init group: group {self.forming!r} is still forming; one at a time")
        if g["name"] in self.update_groups:
            return _fail(f"Failed to init group: a group named {g['name']!r} exists; destroy it first")
        self.forming = g["name"]
        timeout = timedelta(seconds=self.limits.rendezvous_timeout_s)
        try:
            group = await asyncio.get_running_loop().run_in_executor(
                self._group_pool,
                functools.partial(
                    new_weight_update_group,
                    g["address"],
                    g["port"],
                    g["rank"],
                    g["world"],
                    g["name"],
                    g["backend"],
                    rendezvous_timeout=timeout,
                ),
            )
        except Exception as e:  # reply like SGLang: success false with the reason
            return _fail(f"Failed to init group: {type(e).__name__}: {_short(str(e), 300)}")
        finally:
            self.forming = None
        self.update_groups[g["name"]] = group
        return web.json_response(
            {"success": True, "message": "Succeeded to initialize custom process group."}
        )

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        name = (await self._body(request)).get("group_name", "weight_update_group")
        if not isinstance(name, str):
            raise _BadRequest("/destroy_weights_update_group: group_name must be a string")
        group = self.update_groups.pop(name, None)
        if group is None:
            return _fail(f"Failed to destroy group: no group named {_short(name)}")
        torch.distributed.destroy_process_group(group)  # frees its name and sockets too
        return web.json_response({"success": True, "message": "Succeed to destroy custom process group."})

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        await self._body(request)
        if self.session is not None:
            return _fail("a weight-update session is already open; call end_weight_update() first")
        if self.loading_from_disk:
            return _fail(self._update_busy())
        self.session = {"version": self.engine.version, "error": None}
        await self.engine.begin_weight_update(self.engine.version)
        return web.json_response({"success": True, "message": "Success"})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        """Publish the staged weights and version, or discard them all if any bucket failed or some weight of
        the model never arrived (SGLang has no route to drop a session, so a sender that gives up between
        buckets closes it here)."""
        await self._body(request)
        session, self.session = self.session, None
        if session is None:
            return _fail("no weight-update session is open; call begin_weight_update() first")
        missing = self.engine.unstaged_weights() if session["error"] is None else []
        if missing:
            session["error"] = (
                f"the update lacks {len(missing)} of the model's {len(self.engine.weight_names)} weights, "
                f"e.g. {missing[:3]}"
            )
        if session["error"]:
            await self.engine.discard_weight_update(session["error"])
            return _fail(f"update discarded, still serving version {self.engine.version}: {session['error']}")
        await self.engine.finish_weight_update(session["version"])
        return web.json_response({"success": True, "message": "Success"})

    def _bucket_specs(self, body: dict) -> list[tuple[str, Any, Any]]:
        """The announced (name, dtype, shape) triples, checked before any memory is taken for them: at most
        as many elements as the model has, so an announcement cannot make this server allocate more."""
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not (
            len(names) == len(dtypes) == len(shapes)
        ):
            raise _BadRequest("names, dtypes and shapes must be lists of the same length")
        specs, elements = [], 0
        for name, dtype, shape in zip(names, dtypes, shapes):
            if not isinstance(name, str):
                raise _BadRequest(f"names must be strings, got {_short(name)}")
            dt = getattr(torch, dtype, None) if isinstance(dtype, str) else None
            if not isinstance(dt, torch.dtype):
                raise _BadRequest(f"dtypes: {_short(dtype)} (for {_short(name)}) is not a torch dtype")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
            ):
                raise _BadRequest(f"shapes: {_short(shape)} (for {_short(name)}) is not a list of sizes")
            size = math.prod(shape)
            elements += size
            specs.append((name, dt, torch.Size(shape)))
        if elements > self.engine.num_elements:
            raise _BadRequest(
                f"the bucket announces {elements} elements, more than the model's {self.engine.num_elements}"
            )
        return specs

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive the announced tensors by broadcast from the trainer (rank 0), then stage them. A bucket whose
        broadcast breaks off (the trainer died or gave the group up, a timeout) stages nothing: the trainer
        sends it again on a new group, or end_weight_update finds its weights missing and discards the update.
        A bucket that arrived but cannot be staged (unknown name, wrong shape) fails the session."""
        body = await self._body(request)
        if self.session is None:  # sglang >= 0.5.21: refused, and the broadcast is not joined
            return _fail(
                "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
            )
        specs = self._bucket_specs(body)
        name = body.get("group_name", "weight_update_group")
        group = self.update_groups.get(name) if isinstance(name, str) else None
        if group is None:
            return _fail("no weight update group; call /init_weights_update_group")
        session = self.session
        session["version"] = self._version(body, session["version"])

        def receive():
            out = []
            for tensor_name, dtype, shape in specs:
                tensor = torch.empty(shape, dtype=dtype)
                broadcast_from_trainer(group, tensor)
                out.append((tensor_name, tensor))
            return out

        try:
            tensors = await asyncio.get_running_loop().run_in_executor(self._receive_pool, receive)
        except Exception as e:  # noqa: BLE001 (the broadcast broke off: nothing of this bucket is staged)
            return _fail(
                f"Failed to update weights: the broadcast failed ({type(e).__name__}: {_short(str(e), 300)}); "
                "nothing of this bucket is staged: send it again, or end_weight_update discards the update"
            )
        if session["error"] is None:
            try:
                await self.engine.update_weights_bucket(tensors)
            except (KeyError, ValueError) as e:
                session["error"] = str(e)
        if session["error"] is not None:
            return _fail(f"Failed to update weights (the update will be discarded): {session['error']}")
        return self._flushed(body, "Succeeded to update parameter online.")


def check_bind(host: str, api_key: str | None) -> None:
    """Loopback is the default; serving beyond it without a key would let anyone on the network load weights."""
    if not api_key and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host} without --api-key: anyone who can reach it could "
            "generate or load weights. Pass --api-key (and the same key to the client), or bind 127.0.0.1."
        )


async def serve(engine: LocalEngine, host: str, port: int, **server_kwargs) -> web.AppRunner:
    """Start serving in the running loop; returns the runner (call `await runner.cleanup()` to stop). The
    process's noisy loggers are rate-limited, and its gloo sockets listen on `host`'s interface."""
    check_bind(host, server_kwargs.get("api_key"))
    limit_log_rate()
    bind_gloo_to(host)
    return await LocalSGLangServer(engine, **server_kwargs).start(host, port)


def _routed_base64(routed_experts, start: int) -> str | None:
    """A sample's routing from position `start` as SGLang 0.5.23 sends it: base64 of the int32 array
    [tokens, layers, top_k]; None when the engine records none (started without --enable-return-routed-experts,
    where SGLang's reply has no routed_experts either)."""
    if routed_experts is None:
        return None
    return base64.b64encode(np.ascontiguousarray(routed_experts[start:], dtype="<i4").tobytes()).decode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF model dir")
    parser.add_argument("--host", default="127.0.0.1", help="a non-loopback address needs --api-key")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-id", default=None)
    parser.add_argument(
        "--api-key", default=None, help="required as 'Authorization: Bearer KEY' (not on /health)"
    )
    parser.add_argument(
        "--admin-api-key", default=None, help="required instead of --api-key on control routes"
    )
    parser.add_argument("--max-n", type=int, default=64, help="largest sampling_params.n served")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="largest sampling_params.max_new_tokens (default: context)",
    )
    parser.add_argument(
        "--enable-return-routed-experts",
        action="store_true",
        help="MoE models: record the experts every token is routed to and return them to requests that ask "
        "(return_routed_experts), as SGLang's flag of the same name",
    )
    server_limits.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        check_bind(args.host, args.api_key)
        limits = server_limits.from_args(args)
    except ValueError as e:
        parser.error(str(e))

    async def run() -> None:
        engine = LocalEngine(
            args.model,
            engine_id=args.engine_id or f"local@{args.port}",
            threads=args.threads,
            seed=args.seed,
            record_routing=args.enable_return_routed_experts,
        )
        await serve(
            engine,
            args.host,
            args.port,
            api_key=args.api_key,
            admin_api_key=args.admin_api_key,
            max_n=args.max_n,
            max_new_tokens=args.max_new_tokens,
            limits=limits,
        )
        logger.info("serving %s on http://%s:%d", args.model, args.host, args.port)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
