"""Serve a LocalEngine over the subset of SGLang's native HTTP API that the SGLang client uses.

Two uses: a CPU farm of engine processes (each its own Python process and core, killable on its
own) behind the same client code the GPU farm uses, and the reference server the SGLang client is
tested against, with real tokens and log-probs. Request and reply fields follow SGLang's
`GenerateReqInput` and its /generate reply (meta_info.output_token_logprobs, finish_reason, ...).

    python -m megatron_m2po.rollout.engines.local_server --model HF_DIR --port 30000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from aiohttp import web

from megatron_m2po.rollout.engines.local import LocalEngine
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


class _BadRequest(Exception):
    pass


def _sampling(d: Any) -> tuple[SamplingParams, int]:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise _BadRequest("sampling_params must be an object")
    unknown = set(d) - _SAMPLING_KEYS
    if unknown:
        raise _BadRequest(f"unsupported sampling_params {sorted(unknown)}")
    params = SamplingParams(
        max_new_tokens=int(d.get("max_new_tokens", 128)),
        temperature=float(d.get("temperature", 1.0)),
        top_p=float(d.get("top_p", 1.0)),
        top_k=int(d.get("top_k", -1)),
        stop_token_ids=list(d.get("stop_token_ids") or []),
        seed=d.get("sampling_seed"),
    )
    return params, int(d.get("n", 1))


class LocalSGLangServer:
    """aiohttp app around one LocalEngine; `inflight` maps rid -> task so /abort_request can cancel it."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine
        self.inflight: dict[str, asyncio.Task] = {}
        self.app = web.Application(client_max_size=1 << 28)
        r = self.app.router
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health)
        r.add_get("/get_model_info", self.model_info)
        r.add_get("/get_server_info", self.server_info)
        r.add_post("/generate", self.generate)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/flush_cache", self.flush_cache)
        r.add_get("/flush_cache", self.flush_cache)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_post("/init_weights_update_group", self.init_weights_update_group)
        r.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        self.update_groups: dict[str, Any] = {}

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self.engine.health() else 503)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": str(self.engine.hf_dir), "is_generation": True})

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": str(self.engine.hf_dir),
                "tp_size": 1,
                "dp_size": 1,
                "weight_version": str(self.engine.version),
                "pid": os.getpid(),
            }
        )

    async def generate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise _BadRequest("body must be a JSON object")
            input_ids = body.get("input_ids")
            if (
                not isinstance(input_ids, list)
                or not input_ids
                or not all(isinstance(t, int) for t in input_ids)
            ):
                raise _BadRequest(
                    "input_ids must be one non-empty list of token ids (batches are not served here)"
                )
            params, n = _sampling(body.get("sampling_params"))
        except (_BadRequest, ValueError, TypeError) as e:
            return web.json_response({"error": {"message": str(e)}}, status=400)
        rid = str(body.get("rid") or os.urandom(8).hex())
        return_logprob = bool(body.get("return_logprob", False))
        task = asyncio.ensure_future(self.engine.generate(rid, input_ids, n, params))
        self.inflight[rid] = task
        try:
            samples = await task
        except asyncio.CancelledError:
            if request.transport is None or request.transport.is_closing():
                raise
            return web.json_response(self._reply(rid, input_ids, [], [], "abort", return_logprob))
        except ValueError as e:
            return web.json_response({"error": {"message": str(e)}}, status=400)
        finally:
            self.inflight.pop(rid, None)
        replies = [
            self._reply(
                rid if n == 1 else f"{rid}_{s.group_index}",
                input_ids,
                s.response_ids,
                s.behavior_logprobs,
                s.finish_reason,
                return_logprob,
                s.response_text,
                min(s.versions, default=self.engine.version),
            )
            for s in samples
        ]
        return web.json_response(replies[0] if n == 1 else replies)

    def _reply(self, rid, input_ids, tokens, logprobs, finish, return_logprob, text="", version=None) -> dict:
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
            "weight_version": str(self.engine.version if version is None else version),
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(logprobs, tokens)]
        return {"text": text, "output_ids": list(tokens), "meta_info": meta}

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await request.json()
        targets = list(self.inflight) if body.get("abort_all") else [body.get("rid", "")]
        for rid in targets:
            task = self.inflight.get(rid)
            if task is not None:
                task.cancel()
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        if body.get("mode", "abort") == "abort":
            for task in list(self.inflight.values()):
                task.cancel()
        await self.engine.pause()
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await self.engine.resume()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        return web.Response(text="Cache flushed.", status=200)

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            version = int(body.get("weight_version") or self.engine.version + 1)
            await self.engine.update_weights_from_disk(body["model_path"], version)
        except (KeyError, ValueError, FileNotFoundError) as e:
            return web.json_response({"success": False, "message": f"{type(e).__name__}: {e}"})
        return web.json_response(
            {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        )

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """Join the trainer's weight-update group as rank `rank_offset` (gloo here; SGLang uses NCCL)."""
        from megatron_m2po.sync.process_group import new_weight_update_group

        body = await request.json()
        try:
            name = body.get("group_name", "weight_update_group")
            self.update_groups[name] = await asyncio.to_thread(
                new_weight_update_group,
                body["master_address"],
                int(body["master_port"]),
                int(body["rank_offset"]),
                int(body["world_size"]),
                name,
                body.get("backend", "gloo"),
            )
        except Exception as e:  # reply like SGLang: success false with the reason
            return web.json_response({"success": False, "message": f"{type(e).__name__}: {e}"})
        return web.json_response(
            {"success": True, "message": "Succeeded to initialize custom process group."}
        )

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive the announced tensors by broadcast from the trainer (rank 0), then load them."""
        import torch

        from megatron_m2po.sync.process_group import broadcast_from_trainer

        body = await request.json()
        group = self.update_groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            return web.json_response(
                {"success": False, "message": "no weight update group; call /init_weights_update_group"}
            )
        specs = list(zip(body["names"], body["dtypes"], body["shapes"]))

        def receive():
            out = []
            for name, dtype, shape in specs:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                broadcast_from_trainer(group, tensor)
                out.append((name, tensor))
            return out

        tensors = await asyncio.to_thread(receive)
        version = int(body["weight_version"]) if body.get("weight_version") else self.engine.version
        try:
            await self.engine.update_weights(tensors, version)
        except (KeyError, ValueError) as e:
            return web.json_response({"success": False, "message": str(e)})
        return web.json_response({"success": True, "message": "Succeeded to update parameter online."})


async def serve(engine: LocalEngine, host: str, port: int) -> web.AppRunner:
    """Start serving in the running loop; returns the runner (call `await runner.cleanup()` to stop)."""
    runner = web.AppRunner(LocalSGLangServer(engine).app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF model dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-id", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    async def run() -> None:
        engine = LocalEngine(
            args.model, engine_id=args.engine_id or f"local@{args.port}", threads=args.threads, seed=args.seed
        )
        await serve(engine, args.host, args.port)
        logger.info("serving %s on http://%s:%d", args.model, args.host, args.port)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
