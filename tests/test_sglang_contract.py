"""The SGLang client against the pinned sglang==0.5.23 / sglang-router==0.3.2 packages' own schema and source.

`import sglang` needs a GPU stack, but the files checked here do not: `sglang/api/v1/api_types.py` (the
generated /generate schema, msgspec only) loads by file path, and `http_server.py` / `io_struct.py` are
read with `ast`. `.ci/run` downloads both wheels once (no install) and unzips them into
$M2PO_SGLANG_SRC (default ~/.cache/m2po_ci/sglang-0.5.23). Outside CI a missing copy skips; in CI it fails.

Every body the client sends is recorded by a contract server that checks /generate with
`GenerateRequest.from_json_value` (what the 0.5.23 route does before serving) and control bodies
against the io_struct class the pinned route declares, and that answers with replies built from the
pinned `GenerateResponse` / `GenerateMetaInfo` types.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import os
import re
import sys
import types
import typing
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from megatron_m2po.net import free_port
from megatron_m2po.rollout.engines.base import EngineError
from megatron_m2po.rollout.engines.sglang import (
    CONTROL_ROUTES,
    ROUTER_ONLY_ROUTE,
    SGLANG_ROUTER_VERSION,
    SGLANG_VERSION,
    SGLangEngine,
    parse_generate_reply,
    token_versions,
)
from megatron_m2po.rollout.seeding import request_seed
from megatron_m2po.types import SamplingParams

if os.environ.get("CI", "").lower() == "true":
    import msgspec  # in CI the contract check must run, never skip
    import pydantic
else:
    msgspec = pytest.importorskip("msgspec", reason="msgspec (the dev extra) loads SGLang's generated schema")
    pydantic = pytest.importorskip(
        "pydantic", reason="pydantic (the dev extra) parses bodies as SGLang's route"
    )

SRC = Path(os.environ.get("M2PO_SGLANG_SRC", f"~/.cache/m2po_ci/sglang-{SGLANG_VERSION}")).expanduser()
API_TYPES = SRC / "sglang/api/v1/api_types.py"
HTTP_SERVER = SRC / "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = SRC / "sglang/srt/managers/io_struct.py"
VERSION_FILE = SRC / "sglang/_version.py"
ROUTER_DIR = SRC / "sglang_router"
QWEN3_MOE = SRC / "sglang/srt/models/qwen3_moe.py"
FUSED_MOE_LAYER = SRC / "sglang/srt/layers/moe/fused_moe_triton/layer.py"
WEIGHT_UPDATER = SRC / "sglang/srt/model_executor/model_runner_components/weight_updater.py"
API_CONTRACT = SRC / "sglang/srt/entrypoints/api_contract.py"
SAMPLING_PARAMS = SRC / "sglang/srt/sampling/sampling_params.py"
TOKENIZER_MANAGER = SRC / "sglang/srt/managers/tokenizer_manager.py"
WEIGHT_VERSIONS = SRC / "sglang/srt/utils/weight_versions.py"
ROUTED_EXPERTS = SRC / "sglang/srt/state_capturer/routed_experts.py"
DETOKENIZER = SRC / "sglang/srt/managers/detokenizer_manager.py"
EXEC_ARGS = SRC / "sglang/srt/arg_groups/fields/exec_.py"
ARG_UTILS = SRC / "sglang/srt/arg_groups/arg_utils.py"
PINNED = [
    API_CONTRACT,
    SAMPLING_PARAMS,
    TOKENIZER_MANAGER,
    WEIGHT_VERSIONS,
    ROUTED_EXPERTS,
    DETOKENIZER,
    EXEC_ARGS,
    ARG_UTILS,
    API_TYPES,
    HTTP_SERVER,
    IO_STRUCT,
    VERSION_FILE,
    QWEN3_MOE,
    FUSED_MOE_LAYER,
    WEIGHT_UPDATER,
    ROUTER_DIR / "mini_lb.py",
    ROUTER_DIR / "version.py",
]


def _require_pinned() -> None:
    missing = [str(p) for p in PINNED if not p.exists()]
    if not missing:
        return
    reason = (
        f"pinned sglang sources missing ({', '.join(missing)}); .ci/run puts them there with "
        f"`pip download --no-deps sglang=={SGLANG_VERSION} sglang-router=={SGLANG_ROUTER_VERSION}` + unzip "
        "(set M2PO_SGLANG_SRC to another copy)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def api():
    """sglang/api/v1/api_types.py of the pinned wheel, loaded by file path (needs only msgspec)."""
    _require_pinned()
    spec = importlib.util.spec_from_file_location("pinned_sglang_api_types", API_TYPES)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _AnyName(dict):
    """eval namespace: typing names resolve, every other name (sglang-internal types) is Any."""

    def __missing__(self, key):
        builtin = {t.__name__: t for t in (int, float, str, bool, bytes, list, dict, tuple)}
        return builtin.get(key) or getattr(typing, key, typing.Any)


def _io_struct_fields() -> dict[str, dict[str, tuple[str, bool]]]:
    """class -> field -> (annotation source, has a default) of every class of the pinned io_struct.py, with the
    fields of its io_struct bases (BaseReq adds rid, http_worker_ipc)."""
    tree = ast.parse(IO_STRUCT.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def fields(name: str) -> dict[str, tuple[str, bool]]:
        node, out = classes[name], {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(fields(base.id))
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                annotation = stmt.annotation
                if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
                    annotation = annotation.slice.elts[0]  # the type; its validator is sglang-internal
                if not ast.unparse(annotation).startswith("ClassVar"):
                    out[stmt.target.id] = (ast.unparse(annotation), stmt.value is not None)
        return out

    return {name: fields(name) for name in classes}


def _annotation_type(annotation: str):
    """An io_struct annotation as a type: typing names resolve, sglang-internal types are Any."""
    try:
        return eval(annotation, {"__builtins__": {}}, _AnyName())  # noqa: S307 (the pinned source)
    except Exception:
        return typing.Any


def _io_structs() -> dict[str, type]:
    """Every request class of the pinned io_struct.py as a strict msgspec Struct (unknown fields rejected);
    defaults only mark a field optional."""
    structs = {}
    for name, fields in _io_struct_fields().items():
        spec = [
            (field, _annotation_type(ann), None) if has_default else (field, _annotation_type(ann))
            for field, (ann, has_default) in fields.items()
        ]
        spec.sort(key=len)  # required fields first
        structs[name] = msgspec.defstruct(name, spec, kw_only=True, forbid_unknown_fields=True)
    return structs


def _generate_req_input_model():
    """io_struct.GenerateReqInput as the pydantic model FastAPI validates a /generate body with (the pinned
    route's `obj: GenerateReqInput`), strict about unknown fields: the route would drop them silently."""
    fields = _io_struct_fields()["GenerateReqInput"]
    spec = {
        f: (_annotation_type(ann), None if has_default else ...) for f, (ann, has_default) in fields.items()
    }
    return pydantic.create_model(
        "GenerateReqInput",
        __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **spec,
    )


def _routes(source: str) -> dict[str, tuple[set[str], str | None]]:
    """path -> (HTTP methods, io_struct class of the `obj` body parameter) of a FastAPI app's routes."""
    routes: dict[str, tuple[set[str], str | None]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = None
        for arg in node.args.args:
            if arg.arg == "obj" and arg.annotation is not None:
                ann = arg.annotation
                if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
                    ann = ann.slice.elts[0]
                body = ast.unparse(ann)
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)) or not dec.args:
                continue
            path = dec.args[0]
            if not isinstance(path, ast.Constant) or not isinstance(path.value, str):
                continue
            if dec.func.attr == "api_route":
                methods = next(
                    (set(ast.literal_eval(k.value)) for k in dec.keywords if k.arg == "methods"), {"GET"}
                )
            elif dec.func.attr in ("get", "post", "put", "delete"):
                methods = {dec.func.attr.upper()}
            else:
                continue
            old = routes.get(path.value, (set(), None))
            routes[path.value] = (old[0] | methods, body or old[1])
    return routes


def _pinned_module(path: Path, **provided) -> dict:
    """The top-level definitions of a pinned source file, executed without its `sglang.*` imports (they pull
    in the GPU stack); `provided` stands in for the imported names the code under test never reaches."""
    tree = ast.parse(path.read_text())
    tree.body = [
        node
        for node in tree.body
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sglang"))
    ]
    module = types.ModuleType(f"pinned_sglang_{path.stem}")
    module.__dict__.update(provided)
    sys.modules[module.__name__] = module  # dataclasses resolve string annotations through it
    exec(compile(tree, str(path), "exec"), module.__dict__)  # noqa: S102 (the pinned source)
    return module.__dict__


class PinnedServerSide:
    """What the pinned 0.5.23 server does with a /generate body after its contract gate, run from its own source:
    FastAPI parses the body into io_struct.GenerateReqInput (a field it does not know would be dropped silently,
    so it is refused here), the tokenizer manager builds sampling_params.SamplingParams from
    `sampling_params`, normalizes and verifies it; and how it writes the reply: log-prob entries by
    TokenizerManager.detokenize_logprob_tokens, weight-version spans by utils/weight_versions.py."""

    VOCAB = 1024

    def __init__(self):
        self.request_model = _generate_req_input_model()
        # the watermark import is never reached: no request of the client carries a watermark
        self.sampling_params_class = _pinned_module(
            SAMPLING_PARAMS, WatermarkRequestConfig=typing.Any, normalize_watermark_request=lambda w: w
        )["SamplingParams"]
        self.weight_versions = _pinned_module(WEIGHT_VERSIONS, msgspec_struct_pydantic_core_schema=None)
        detokenize = _method(TOKENIZER_MANAGER, "TokenizerManager", "detokenize_logprob_tokens")
        namespace: dict = {"List": list}
        exec(compile(ast.Module([detokenize], []), str(TOKENIZER_MANAGER), "exec"), namespace)  # noqa: S102
        self._detokenize = namespace["detokenize_logprob_tokens"]

    def check(self, body: dict):
        """The body's SamplingParams as the server holds it; raises what the server would refuse."""
        self.request_model.model_validate(body)
        params = self.sampling_params_class(**(body.get("sampling_params") or {}))
        params.normalize(None)
        params.verify(self.VOCAB)
        return params

    def reply(
        self, rid: str, prompt_len: int, tokens: list[int], logprobs: list[float], finish: dict, updates
    ):
        """The non-streaming reply dict the tokenizer manager returns for a finished request; `updates` are
        (old version, output tokens generated before the update) as the scheduler records them."""
        wv = self.weight_versions
        events = [wv["WeightVersionEvent"](old_version=v, num_output_tokens=k) for v, k in updates[:-1]]
        spans = wv["compute_weight_version_spans"](events, updates[-1][0], len(tokens))
        meta = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": prompt_len,
            "reasoning_tokens": 0,
            "completion_tokens": len(tokens),
            "cached_tokens": 0,
            "input_token_logprobs": [],
            "output_token_logprobs": self._detokenize(None, logprobs, tokens, False),
            "output_token_logprobs_length": len(tokens),
        }
        wv["add_weight_versions_to_meta_info"](meta, spans, num_output_tokens=len(tokens))
        # the route answers through orjson: tuples become arrays
        return json.loads(json.dumps({"text": "", "output_ids": list(tokens), "meta_info": meta}))


class ContractServer:
    """Answers the client as the pinned 0.5.23 routes would, from their own schema; records every request.

    `script`, when given, is the model: input ids -> (output tokens, their log-probs, the matched stop token or
    None, weight updates as (old version, tokens before it) ... (current version, None)); the reply is then
    built by the pinned tokenizer manager's own code (PinnedServerSide.reply)."""

    def __init__(
        self,
        api,
        *,
        deterministic: bool = False,
        tp_size: int = 1,
        router_ready: bool = False,
        script=None,
    ):
        self.api, self.deterministic, self.tp_size = api, deterministic, tp_size
        self.router_ready = router_ready  # also answers the router's /readiness (it stands in for one)
        self.script = script
        self.structs = _io_structs()
        self.server_side = PinnedServerSide()
        self.sampling: list = []  # the pinned SamplingParams of every /generate, in order
        self.routes = _routes(HTTP_SERVER.read_text())
        self.requests: list[tuple[str, str, dict]] = []
        self.errors: list[str] = []
        self.versions = [
            ("3", 2),
            ("4", None),
        ]  # weight_versions spans of every reply: v3 for 2 tokens, then v4

    def reply(self, rid: str, index: int, tokens: list[int]) -> dict:
        api = self.api
        spans, start = [], 0
        for version, length in self.versions:
            end = len(tokens) if length is None else min(start + length, len(tokens))
            if end > start:
                spans.append(api.WeightVersionSpan(version=version, start=start, end=end))
            start = end
        meta = api.GenerateMetaInfo(
            id=rid,
            prompt_tokens=3,
            completion_tokens=len(tokens),
            finish_reason=api.FinishLength(length=len(tokens)),
            output_token_logprobs=[
                api.LogprobEntry(logprob=-0.25 * (i + 1), token_id=t) for i, t in enumerate(tokens)
            ],
            weight_version=spans[-1].version,
            weight_versions=spans,
        )
        # no `index`: 0.5.23 sets it on streamed chunks only
        return api.GenerateResponse(text="x", meta_info=meta, output_ids=tokens).to_json_value()

    async def handle(self, request: web.Request) -> web.Response:
        path, method = request.path, request.method
        text = await request.text()
        body = json.loads(text) if text.strip() else {}
        self.requests.append((method, path, body))
        methods, struct = self.routes.get(path, (set(), None))
        if path == ROUTER_ONLY_ROUTE and not methods:  # the client's router probe: the pinned server 404s
            return web.json_response({"status": "ready"}) if self.router_ready else web.Response(status=404)
        if method not in methods:
            self.errors.append(f"{method} {path}: no such route in the pinned http_server.py")
            return web.Response(status=404)
        if path == "/server_info":
            return web.json_response(
                {
                    "tp_size": self.tp_size,
                    "dp_size": 1,
                    "pp_size": 1,
                    "enable_deterministic_inference": self.deterministic,
                    "version": SGLANG_VERSION,
                }
            )
        if path in ("/ready", "/model_info", "/health"):
            return web.json_response({})
        if path == "/generate":
            try:
                req = self.api.GenerateRequest.from_json_value(body)
            except self.api.JsonContractError as e:  # http_server.generate_request: 400 {"error": ...}
                self.errors.append(f"/generate {body}: {e}")
                return web.json_response({"error": str(e)}, status=400)
            try:
                self.sampling.append(self.server_side.check(body))
            except (pydantic.ValidationError, TypeError, ValueError) as e:
                self.errors.append(f"/generate {body}: the pinned server refuses it: {e}")
                return web.json_response({"error": str(e)}, status=400)
            if self.script is not None:
                tokens, logprobs, matched, updates = self.script(list(req.input_ids))
                limit = req.sampling_params.max_new_tokens
                finish = (
                    {"type": "stop", "matched": matched}
                    if matched is not None
                    else {"type": "length", "length": limit}
                )
                reply = self.server_side.reply(req.rid, len(req.input_ids), tokens, logprobs, finish, updates)
                return web.json_response(reply)
            n = req.sampling_params.n or 1
            max_new = req.sampling_params.max_new_tokens
            replies = [
                self.reply(f"{req.rid}-{i}", i, [10 + i + j for j in range(max_new)]) for i in range(n)
            ]
            return web.json_response(replies if n > 1 else replies[0])
        if struct is None:
            if body:
                self.errors.append(f"{path}: the pinned route takes no body, got {body}")
        else:
            try:
                msgspec.convert(body, self.structs[struct])
            except msgspec.ValidationError as e:
                self.errors.append(f"{path} {body} vs io_struct.{struct}: {e}")
                return web.json_response(
                    {"success": False, "message": f"io_struct.{struct}: {e}"}, status=400
                )
        if path == "/flush_cache":
            return web.Response(text="Cache flushed.\n")
        return web.json_response({"success": True, "message": "Success"})

    async def __aenter__(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


PARAMS = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=-1, stop_token_ids=[2], seed=11)


def test_generate_bodies_validate_against_pinned_schema(api):
    """Groups of 1 and n (one request per sample) and deterministic (seeded) bodies all decode with
    GenerateRequest.from_json_value, use no field the schema ignores, and the replies built from
    GenerateResponse / GenerateMetaInfo come back as samples with per-token versions."""

    async def run(deterministic: bool, n: int):
        async with ContractServer(api, deterministic=deterministic) as server:
            client = SGLangEngine(server.url, engine_id="c", deterministic=deterministic, version=3)
            samples = await client.generate("p7", [5, 6, 7], n, PARAMS)
            await client.close()
        return server, samples

    for deterministic, n in [(False, 1), (False, 4), (True, 3)]:
        server, samples = asyncio.run(run(deterministic, n))
        assert not server.errors, server.errors
        bodies = [b for _, path, b in server.requests if path == "/generate"]
        assert len(bodies) == n and len({b["rid"] for b in bodies}) == n  # each abortable by its rid
        for body in bodies:
            req = api.GenerateRequest.from_json_value(body)
            assert set(body) <= set(api.GenerateRequest.__struct_fields__)  # nothing silently ignored
            assert req.input_ids == [5, 6, 7] and req.return_logprob is True and req.stream is False
            sp = req.sampling_params
            assert (sp.temperature, sp.top_p, sp.top_k, sp.max_new_tokens) == (0.7, 0.9, -1, 5)
            assert sp.stop_token_ids == [2] and sp.no_stop_trim and not sp.skip_special_tokens
            assert sp.n == 1
        seeds = [api.GenerateRequest.from_json_value(b).sampling_params.sampling_seed for b in bodies]
        if deterministic:
            assert sorted(seeds) == sorted(request_seed(11, 3, "p7", i) for i in range(n))
        else:
            assert seeds == [None] * n  # honoured only with --enable-deterministic-inference: never sent
        assert [s.group_index for s in samples] == list(range(n))
        for s in samples:  # one request per sample: each is the contract server's sample 0
            assert s.response_ids == [10 + j for j in range(5)]
            assert s.behavior_logprobs == [-0.25 * (j + 1) for j in range(5)]
            assert s.versions == [3, 3, 4, 4, 4] and s.finish_reason == "length"


def test_replies_from_pinned_types_parse(api):
    """GenerateResponse values the pinned encoder writes: spans, 'default' version, abort without log-probs."""
    meta = api.GenerateMetaInfo(
        id="r",
        completion_tokens=3,
        finish_reason=api.FinishStop(matched=7),
        output_token_logprobs=[api.LogprobEntry(logprob=-1.5, token_id=t, text="a") for t in (4, 5, 7)],
        weight_versions=[
            api.WeightVersionSpan(version="default", start=0, end=1),
            api.WeightVersionSpan(version="9", start=1, end=3),
        ],
    )
    reply = api.GenerateResponse(text="abc", meta_info=meta, output_ids=[4, 5, 7]).to_json_value()
    tokens, logprobs, finish, parsed = parse_generate_reply(reply, "w")
    assert (tokens, logprobs, finish) == ([4, 5, 7], [-1.5] * 3, "stop")
    assert token_versions(parsed, 3, 8, "w") == [8, 9, 9]  # "default": the version the request started on
    aborted = api.GenerateResponse(
        meta_info=api.GenerateMetaInfo(id="r", finish_reason=api.FinishAbort(message="aborted"))
    ).to_json_value()
    assert parse_generate_reply(aborted, "w")[:3] == ([], [], "abort")
    single = api.GenerateResponse(
        meta_info=api.GenerateMetaInfo(
            id="r",
            completion_tokens=1,
            finish_reason=api.FinishLength(length=1),
            output_token_logprobs=[api.LogprobEntry(logprob=-0.5, token_id=3)],
            weight_version="6",
        ),
        output_ids=[3],
    ).to_json_value()
    assert token_versions(parse_generate_reply(single, "w")[3], 1, 7, "w") == [6]


def test_control_bodies_match_pinned_io_struct(api):
    """Every control call of an NCCL update, a disk update, pause/continue and abort: the route exists in
    the pinned http_server.py and the body converts strictly to the io_struct class that route declares."""

    async def run():
        async with (
            ContractServer(api, tp_size=2) as a,
            ContractServer(api, tp_size=1) as b,
            ContractServer(api, router_ready=True) as router,
        ):
            client = SGLangEngine(router.url, worker_urls=[a.url, b.url], engine_id="c")
            assert await client.health()
            await client.init_weights_update_group("10.0.0.1", 29500, 1, 4, "g", "nccl")
            await client.begin_weight_update(5)
            await client.update_weights_from_distributed(["w"], ["bfloat16"], [[2, 3]], 5, group_name="g")
            await client.finish_weight_update(5)
            await client.update_weights_from_disk("/ckpt/v6", 6)
            await client.pause()
            await client.resume()
            await client.abort_all()
            await client._abort_quietly("rid-1")
            await client.destroy_weights_update_group("g")
            await client.close()
            return a, b, client

    a, b, client = asyncio.run(run())
    assert not a.errors and not b.errors, a.errors + b.errors
    assert client.version == 6 and client.gpus == 3
    paths = [p for _, p, _ in a.requests]
    for path in CONTROL_ROUTES:
        assert path in paths, f"the client never called {path}"
    assert [p for _, p, _ in b.requests if p in CONTROL_ROUTES] == [p for p in paths if p in CONTROL_ROUTES]
    offsets = [
        body["rank_offset"] for s in (a, b) for _, p, body in s.requests if p == "/init_weights_update_group"
    ]
    assert offsets == [1, 3]  # the tp=2 server takes ranks 1-2, the next one starts at 3
    session = [
        p
        for p in paths
        if p
        in (
            "/begin_weight_update",
            "/update_weights_from_distributed",
            "/end_weight_update",
            "/flush_cache",
            "/continue_generation",
        )
    ]
    assert session[:5] == [
        "/begin_weight_update",
        "/update_weights_from_distributed",
        "/end_weight_update",
        "/flush_cache",
        "/continue_generation",
    ]
    bucket = next(body for _, p, body in a.requests if p == "/update_weights_from_distributed")
    assert bucket["flush_cache"] is False and bucket["weight_version"] == "5"


def test_cpu_server_speaks_the_pinned_schema(api, tmp_path):
    """The CPU engine server the other tests run the client against: the client's bodies pass its checks and
    its /generate replies (single and n) decode with the pinned GenerateResponse, weight_versions included."""
    from megatron_m2po.models.tiny import make_tiny_model
    from megatron_m2po.rollout.engines.local import LocalEngine
    from megatron_m2po.rollout.engines.local_server import LocalSGLangServer
    from megatron_m2po.rollout.engines.sglang import generate_payload, sglang_sampling_params

    engine = LocalEngine(make_tiny_model("qwen3", tmp_path / "tiny", seed=1))
    params = SamplingParams(max_new_tokens=4, temperature=0.9, stop_token_ids=[2])

    async def run():
        runner = web.AppRunner(LocalSGLangServer(engine).app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        replies = []
        async with aiohttp.ClientSession() as http:
            for n in (1, 3):
                body = generate_payload(f"r{n}", [5, 6, 7], sglang_sampling_params(params, n=n))
                async with http.post(f"http://127.0.0.1:{port}/generate", json=body) as r:
                    assert r.status == 200, await r.text()
                    replies.append(await r.json())
        await runner.cleanup()
        return replies

    single, group = asyncio.run(run())
    assert isinstance(group, list) and len(group) == 3
    for reply in [single, *group]:
        decoded = api.GenerateResponse.from_json_value(reply)
        meta = decoded.meta_info
        tokens = [e.token_id for e in meta.output_token_logprobs]
        assert decoded.output_ids == tokens and meta.completion_tokens == len(tokens)
        assert [(w.start, w.end) for w in meta.weight_versions] == [(0, len(tokens))]
        assert token_versions(reply["meta_info"], len(tokens), 0, "w") == [0] * len(tokens)


def test_admin_key_routes_are_the_pinned_admin_optional_routes():
    """The client sends --admin-api-key on exactly the routes 0.5.23 marks ADMIN_OPTIONAL (utils/auth.py), and
    the plain key on the routes it marks NORMAL (no auth_level decorator)."""
    _require_pinned()
    levels: dict[str, str] = {}
    for node in ast.walk(ast.parse(HTTP_SERVER.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            level = next(
                (
                    ast.unparse(d.args[0])
                    for d in node.decorator_list
                    if isinstance(d, ast.Call) and ast.unparse(d.func) == "auth_level"
                ),
                "AuthLevel.NORMAL",
            )
            for d in node.decorator_list:
                if isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant):
                    levels[str(d.args[0].value)] = level
    for path in CONTROL_ROUTES:
        assert levels[path] == "AuthLevel.ADMIN_OPTIONAL", path
    for path in ("/generate", "/server_info", "/model_info", "/ready"):
        assert levels[path] == "AuthLevel.NORMAL", path


def test_router_has_no_control_routes():
    """sglang-router 0.3.2 forwards generation only: none of the control routes the client sends to workers."""
    _require_pinned()
    mini_lb = _routes((ROUTER_DIR / "mini_lb.py").read_text())
    assert "/generate" in mini_lb
    native = next(ROUTER_DIR.glob("sglang_router_rs*.so")).read_bytes()
    assert b"/generate" in native
    for path in CONTROL_ROUTES:
        if path == "/flush_cache":  # the router fans /flush_cache out itself; the client never sends it there
            continue
        assert path not in mini_lb and path.encode() not in native, path


def test_pinned_versions_everywhere():
    """setup.py, the client's constants and the downloaded wheels name the same versions."""
    _require_pinned()
    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    assert re.search(r'"sglang(\[[a-z,]+\])?==' + re.escape(SGLANG_VERSION) + '"', setup)
    assert f'"sglang-router=={SGLANG_ROUTER_VERSION}"' in setup
    assert re.search(
        r"__version__\s*=.*['\"]" + re.escape(SGLANG_VERSION) + "['\"]", VERSION_FILE.read_text()
    )
    assert SGLANG_ROUTER_VERSION in (ROUTER_DIR / "version.py").read_text()


@pytest.mark.parametrize(
    "path,body,struct",
    [
        ("/pause_generation", {"mode": "sideways"}, "PauseGenerationReqInput"),
        (
            "/update_weights_from_distributed",
            {"names": ["w"], "shapes": [[1]]},
            "UpdateWeightsFromDistributedReqInput",
        ),
        (
            "/init_weights_update_group",
            {"master_address": "h", "master_port": "29500", "rank_offset": 1, "world_size": 2},
            "InitWeightsUpdateGroupReqInput",
        ),
        ("/end_weight_update", {"version": 3}, "EndWeightUpdateReqInput"),
    ],
)
def test_the_contract_check_rejects_bodies_the_pinned_structs_reject(api, path, body, struct):
    """The io_struct check is strict (a wrong literal, a missing field, a wrong type, an unknown field fail),
    and a refused control call (400 {"success": false, "message"}) is an EngineError carrying the message."""

    async def run():
        async with ContractServer(api) as server:
            client = SGLangEngine(server.url, engine_id="c")
            with pytest.raises(EngineError, match=f"HTTP 400.*io_struct.{struct}"):
                await client._control(path, body)
            await client.close()

    asyncio.run(run())


# ------------------------------------------------------------------------------ Qwen3-MoE weight names


def _method(path: Path, cls: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    tree = ast.parse(path.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    (fn,) = [
        f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == name
    ]
    return fn


def _pinned_expert_mapping(num_experts: int) -> list[tuple[str, str, int, str]]:
    """FusedMoE.make_expert_params_mapping of the pinned wheel, called with the arguments the pinned
    Qwen3MoeForCausalLM.load_weights passes (both read from the pinned sources, the former executed)."""
    load = _method(QWEN3_MOE, "Qwen3MoeForCausalLM", "load_weights")
    (call,) = [
        n
        for n in ast.walk(load)
        if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("make_expert_params_mapping")
    ]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg != "num_experts"}
    fn = _method(FUSED_MOE_LAYER, "FusedMoE", "make_expert_params_mapping")
    fn.decorator_list = []
    namespace = {"List": list, "Tuple": tuple}
    exec(compile(ast.Module([fn], []), str(FUSED_MOE_LAYER), "exec"), namespace)  # noqa: S102 (pinned source)
    return namespace["make_expert_params_mapping"](None, num_experts=num_experts, **kwargs)


def test_qwen3_moe_sync_names_are_what_the_pinned_server_loads(tmp_path):
    """Every tensor name a Qwen3-MoE weight sync sends is routed by the pinned server's
    `Qwen3MoeForCausalLM.load_weights` (which `/update_weights_from_distributed` hands the received tensors
    to) to a parameter: attention into its fused qkv, each expert's gate / up / down into the FusedMoE
    `w13` / `w2` weights with its own expert id, the rest (norms, o_proj, router `mlp.gate`) by name."""
    from megatron_m2po import platform
    from megatron_m2po.checkpoint import iter_hf_tensors, load_policy
    from megatron_m2po.models import load_hf_config
    from megatron_m2po.models.tiny import make_tiny_model

    _require_pinned()
    updater = _method(WEIGHT_UPDATER, "WeightUpdater", "load_weights_from_distributed")
    assert "self.get_model().load_weights(named_tensors)" in ast.unparse(updater)
    load = _method(QWEN3_MOE, "Qwen3MoeForCausalLM", "load_weights")
    (stacked,) = [
        ast.literal_eval(n.value)
        for n in ast.walk(load)
        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "stacked_params_mapping"
    ]
    block = ast.unparse(
        next(
            n
            for n in ast.parse(QWEN3_MOE.read_text()).body
            if getattr(n, "name", "") == "Qwen3MoeSparseMoeBlock"
        )
    )
    assert "self.gate = ReplicatedLinear(" in block and "self.experts = " in block

    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", seed=1)
    config = load_hf_config(hf_dir)
    platform.init_distributed()
    try:
        names = [name for name, _ in iter_hf_tensors(load_policy(hf_dir), config)]
    finally:
        platform.destroy_distributed()
    mapping = _pinned_expert_mapping(config.num_experts)
    experts_loaded, by_name = set(), set()
    for name in names:  # the dispatch of the pinned load_weights, branch by branch
        if any(weight in name and "mlp.experts" not in name for _, weight, _ in stacked):
            param = next(p for p, w, _ in stacked if w in name)
            assert param in ("qkv_proj", "gate_up_proj"), name
            continue
        hits = [(param, weight, e, shard) for param, weight, e, shard in mapping if weight in name]
        if "mlp.experts" in name:
            assert len(hits) == 1, (name, hits)  # exactly one expert slot, never skipped as unmapped
            param, weight, e, shard = hits[0]
            target = name.replace(weight, param)
            assert target.endswith(("mlp.experts.w13_weight", "mlp.experts.w2_weight")), target
            layer = int(name.split(".")[2])
            experts_loaded.add((layer, e, shard))
            continue
        assert not hits, name
        by_name.add(re.sub(r"layers\.\d+\.", "layers.N.", name))
    assert experts_loaded == {
        (layer, e, shard)
        for layer in range(config.num_hidden_layers)
        for e in range(config.num_experts)
        for shard in ("w1", "w2", "w3")
    }
    assert by_name == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.N.input_layernorm.weight",
        "model.layers.N.post_attention_layernorm.weight",
        "model.layers.N.self_attn.o_proj.weight",
        "model.layers.N.self_attn.q_norm.weight",
        "model.layers.N.self_attn.k_norm.weight",
        "model.layers.N.mlp.gate.weight",
    }


def test_router_timeout_outlasts_the_client():
    """sglang-router 0.3.2 (router_args.py, RouterArgs.request_timeout_secs) cuts a request at 1800 s by default
    and retries the 504 from scratch under the same rid; the launcher sets the router's bound above the
    client's, so a long request finishes instead."""
    _require_pinned()
    from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher

    router_args = (ROUTER_DIR / "router_args.py").read_text()
    assert re.search(r"request_timeout_secs: int = 1800\b", router_args)
    assert '--{prefix}request-timeout-secs"' in router_args
    client_timeout = SGLangEngine("http://127.0.0.1:1").request_timeout
    for timeout in (client_timeout, 7200.0):
        launcher = EngineLauncher(
            "m", servers=2, ports=[1, 2], router=True, router_port=3, gpu_ids=[0, 1], request_timeout=timeout
        )
        cmd = launcher._router_cmd()
        assert float(cmd[cmd.index("--request-timeout-secs") + 1]) > timeout


def test_readiness_is_a_router_only_route():
    """The client tells a router from a server by ROUTER_ONLY_ROUTE: sglang-router 0.3.2 serves it (and proxies
    /server_info and /get_server_info to a worker, so those cannot tell), SGLang 0.5.23's http_server.py has
    no such route (404)."""
    _require_pinned()
    native = next(ROUTER_DIR.glob("sglang_router_rs*.so")).read_bytes()
    assert (
        ROUTER_ONLY_ROUTE.encode() in native and b"/server_info" in native and b"/get_server_info" in native
    )
    assert ROUTER_ONLY_ROUTE not in _routes(HTTP_SERVER.read_text())
    assert "/server_info" in _routes(HTTP_SERVER.read_text())


# ------------------------------------------------------------------------------ multi-turn, token in / token out


def test_multi_turn_requests_are_token_in_token_out(api):
    """A tool-calling conversation under Qwen3's chat template through the client: each turn's /generate sends
    the trajectory's ids so far as `input_ids` (turn 2 = turn 1's input + its output ids + the environment's
    ids: nothing is re-tokenized, and the server's prefix cache holds), and passes the contract gate, the
    route's GenerateReqInput parse and the tokenizer manager's SamplingParams (the stop token kept in the
    output, special tokens not skipped, log-probs of the output only). The replies, written by the pinned
    tokenizer manager's own code, come back as each turn's ids, log-probs and per-token versions (a weight
    update inside turn 1), and the trajectory is the template's rendering of the whole conversation."""
    from qwen3_chat import TOOLS, im_end_id, qwen3_tokenizer

    from megatron_m2po.rollout.environments.tool_calls import parse_tool_calls
    from megatron_m2po.rollout.environments.trajectory import EnvTurnRenderer, Trajectory

    tok = qwen3_tokenizer()
    im_end, tool_response = im_end_id(tok), tok.convert_tokens_to_ids("<tool_response>")
    call = (
        "<think>\nUse the tool.\n</think>\n\n"
        '<tool_call>\n{"name": "python", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'
    )
    answer = "<think>\nIt printed 42.\n</think>\n\nThe answer is \\boxed{42}."
    update_after = 5  # turn 1: five tokens on v3, the rest on v4

    def model(input_ids):
        turn = input_ids.count(tool_response)
        ids = tok.encode([call, answer][turn], add_special_tokens=False) + [im_end]
        logprobs = [-0.01 * (i + 1) - turn for i in range(len(ids))]
        return ids, logprobs, im_end, [("3", update_after), ("4", None)] if turn == 0 else [("4", None)]

    question = [{"role": "user", "content": "What is 6 * 7?"}]
    prompt = tok.encode(
        tok.apply_chat_template(question, tools=TOOLS, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    params = SamplingParams(max_new_tokens=200, temperature=1.0, stop_token_ids=[im_end])

    async def run():
        async with ContractServer(api, script=model) as server:
            client = SGLangEngine(server.url, engine_id="c", version=3)
            traj, renderer, turns = Trajectory(list(prompt)), EnvTurnRenderer(tok, [im_end]), []
            try:
                while True:
                    (sample,) = await client.generate("p", traj.ids, 1, params)
                    turns.append(sample)
                    traj.add_model_turn(sample.response_ids, sample.behavior_logprobs, sample.versions)
                    if not parse_tool_calls(tok.decode(sample.response_ids), {"python"}):
                        break
                    traj.add_env_turn(renderer.ids("tool", "42", sample.response_ids))
            finally:
                await client.close()
        return server, traj, turns

    server, traj, turns = asyncio.run(run())
    assert not server.errors, server.errors
    bodies = [b for _, path, b in server.requests if path == "/generate"]
    assert len(bodies) == len(turns) == 2
    assert bodies[0]["input_ids"] == prompt
    assert bodies[1]["input_ids"] == prompt + traj.response_ids[: traj.turn_starts[2]]
    assert bodies[1]["input_ids"][: len(bodies[0]["input_ids"])] == bodies[0]["input_ids"]  # a cached prefix
    for body, held in zip(bodies, server.sampling):
        assert "text" not in body and "logprob_start_len" not in body  # token in; output log-probs only (-1)
        assert body["return_logprob"] is True and body["stream"] is False
        assert held.stop_token_ids == {im_end} and held.no_stop_trim and not held.skip_special_tokens
        assert (held.max_new_tokens, held.temperature, held.n) == (200, 1.0, 1)

    first, second = turns
    assert first.response_ids == tok.encode(call, add_special_tokens=False) + [im_end]  # the stop token kept
    assert first.behavior_logprobs == [-0.01 * (i + 1) for i in range(len(first.response_ids))]
    assert first.versions == [3] * update_after + [4] * (len(first.response_ids) - update_after)
    assert second.versions == [4] * len(second.response_ids) and second.finish_reason == "stop"
    assert traj.versions[: len(first.response_ids)] == first.versions
    messages = [
        *question,
        {"role": "assistant", "content": call},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": answer},
    ]
    rendered = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert traj.ids + tok.encode("\n", add_special_tokens=False) == tok.encode(
        rendered, add_special_tokens=False
    )


def _pinned_function(path: Path, name: str, **namespace):
    """A module-level function or staticmethod of a pinned source file, compiled alone (its module imports
    the GPU stack); `namespace` supplies the names it uses."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            node.decorator_list = []
            code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
            scope = {"Optional": typing.Optional, "List": list, **namespace}
            exec(code, scope)  # noqa: S102 (the pinned source)
            return scope[name]
    raise AssertionError(f"{path}: no function {name}")


def test_routed_experts_follow_the_pinned_source(api, tmp_path):
    """Routing replay against 0.5.23: /generate's contract gate (api_contract.py: api_types.GenerateRequest,
    unknown keys ignored) admits the body and the route's own GenerateReqInput (io_struct.py, what FastAPI
    builds the request from) has every field of it, return_routed_experts included; the client decodes what
    the detokenizer encodes; the CPU engine server's reply decodes with the pinned
    extract_routed_experts_from_meta_info and gives the samples the engine's own routing; the launcher's flag
    is the CLI name of the pinned server argument."""
    import base64

    import numpy as np
    import torch

    from megatron_m2po.models.tiny import make_tiny_model
    from megatron_m2po.rollout.engines.local import LocalEngine
    from megatron_m2po.rollout.engines.local_server import LocalSGLangServer
    from megatron_m2po.rollout.engines.sglang import (
        generate_payload,
        parse_routed_experts,
        sglang_sampling_params,
    )
    from megatron_m2po.rollout.engines.sglang_launcher import ROUTED_EXPERTS_FLAG, EngineLauncher

    params = SamplingParams(max_new_tokens=4, temperature=0.9, stop_token_ids=[2])
    body = generate_payload("r", [5, 6, 7], sglang_sampling_params(params), routed_experts=True)
    gate = _pinned_function(
        API_CONTRACT,
        "generate_contract_error",
        GenerateRequest=api.GenerateRequest,
        JsonContractError=api.JsonContractError,
        Any=typing.Any,
    )
    assert gate(body) is None
    assert body["return_routed_experts"] is True and body["routed_experts_start_len"] == 0
    assert "return_routed_experts" not in api.GenerateRequest.__struct_fields__  # the gate ignores it ...
    request_type = next(
        n
        for n in ast.parse(IO_STRUCT.read_text()).body
        if isinstance(n, ast.ClassDef) and n.name == "GenerateReqInput"
    )
    fields = {
        n.target.id: ast.unparse(n.annotation) for n in request_type.body if isinstance(n, ast.AnnAssign)
    }
    assert set(body) <= set(fields)  # ... the route's own request type has every field
    assert (fields["return_routed_experts"], fields["routed_experts_start_len"]) == ("bool", "int")
    assert "routed_experts" not in generate_payload("r", [5], sglang_sampling_params(params))  # dense / off

    encode = _pinned_function(DETOKENIZER, "_b64_encode_per_request", pybase64=base64, torch=torch)
    routing = torch.randint(0, 128, (9, 3, 2), dtype=torch.int32)
    (encoded,) = encode([routing])
    decoded = parse_routed_experts({"routed_experts": encoded}, 9, (3, 2), "w")
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, routing.numpy())

    moe_dir = make_tiny_model("qwen3_moe", tmp_path / "moe", seed=11)
    engine = LocalEngine(moe_dir, record_routing=True)
    config = engine.model.config
    shape = (config.num_hidden_layers, config.num_experts_per_tok)
    extract = _pinned_function(
        ROUTED_EXPERTS, "extract_routed_experts_from_meta_info", np=np, pybase64=base64
    )

    async def run():
        runner = web.AppRunner(LocalSGLangServer(engine).app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/generate", json=body) as r:
                reply = await r.json()
        client = SGLangEngine(f"http://127.0.0.1:{port}", engine_id="c", routed_experts=shape)
        samples = await client.generate("p", [5, 6, 7], 2, params)
        await client.close()
        await runner.cleanup()
        return reply, samples

    reply, samples = asyncio.run(run())
    fed = 3 + reply["meta_info"]["completion_tokens"] - 1
    assert extract(reply).reshape(fed, *shape).shape == (fed, *shape)
    for s in samples:
        assert s.routed_experts.shape == (len(s.prompt_ids) + len(s.response_ids) - 1, *shape)
        assert s.routed_experts.max() < config.num_experts

    server_args = {
        n.target.id: ast.unparse(n.annotation)
        for n in ast.walk(ast.parse(EXEC_ARGS.read_text()))
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    assert server_args["enable_return_routed_experts"].startswith("A[bool")
    assert (
        _pinned_function(ARG_UTILS, "_field_to_cli_name")("enable_return_routed_experts")
        == ROUTED_EXPERTS_FLAG
    )
    launcher = EngineLauncher(moe_dir, backend="local", ports=[1])
    assert ROUTED_EXPERTS_FLAG in launcher._server_cmd(0)[0]
    assert (
        ROUTED_EXPERTS_FLAG
        not in EngineLauncher(moe_dir, backend="local", ports=[1], routed_experts=False)._server_cmd(0)[0]
    )


@pytest.mark.parametrize(
    "change,message",
    [
        ({"input_token_ids": [1, 2]}, "Extra inputs are not permitted"),  # the route would drop it silently
        ({"input_ids": "1 2 3"}, "input_ids"),
        ({"sampling_params": {"max_tokens": 5}}, "max_tokens"),  # OpenAI's name; SGLang's is max_new_tokens
        ({"sampling_params": {"top_p": 0.0}}, "top_p must be in"),
        ({"sampling_params": {"max_new_tokens": -1}}, "max_new_tokens must be at least 0"),
    ],
)
def test_the_pinned_server_side_refuses_what_the_server_refuses(change, message):
    """The checks the contract server adds to the gate fail where the pinned server would refuse the body (or
    lose part of it), so the client's passing bodies mean something."""
    _require_pinned()
    body = {
        "rid": "r",
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 4},
        "return_logprob": True,
    }
    with pytest.raises((pydantic.ValidationError, TypeError, ValueError), match=message):
        PinnedServerSide().check({**body, **change})


def test_router_worker_api_is_what_the_supervisor_calls():
    """sglang-router 0.3.2 (the `smg` crate in its binary) has the worker routes RouterWorkers uses: GET / POST
    /workers, DELETE /workers/{worker_id}, with a WorkerConfigRequest body holding `url` and `api_key`; and no
    legacy /add_worker or /remove_worker routes."""
    _require_pinned()
    native = next(ROUTER_DIR.glob("sglang_router_rs*.so")).read_bytes()
    for handler in (b"list_workers_rest", b"create_worker", b"delete_worker", b"get_worker"):
        assert b"smg..server.." + handler in native, handler
    assert b"/workers/{worker_id}" in native
    assert b"struct WorkerConfigRequest with 20 elements" in native
    assert b"urlapi_keyworker_type" in native  # the request's first fields, as serde names them
    assert b"/add_worker" not in native and b"/remove_worker" not in native


@pytest.mark.parametrize(
    "meta, message",
    [
        ({}, "meta_info.routed_experts is missing.*--enable-return-routed-experts"),
        ({"routed_experts": [1, 2]}, "meta_info.routed_experts is list"),
        ({"routed_experts": "%%%"}, "meta_info.routed_experts is not base64"),
        (
            {"routed_experts": "AAAAAA=="},
            "meta_info.routed_experts holds 4 bytes, expected 48 \\(int32 \\[3 tokens, 2 layers, top_k 2\\]\\)",
        ),
        (
            {"routed_experts": "/////wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
            "meta_info.routed_experts holds expert ids outside \\[0, 65535\\]",
        ),
    ],
)
def test_malformed_routed_experts_are_named(meta, message):
    from megatron_m2po.rollout.engines.base import EngineReplyError
    from megatron_m2po.rollout.engines.sglang import parse_routed_experts

    with pytest.raises(EngineReplyError, match="where: " + message):
        parse_routed_experts(meta, 3, (2, 2), "where")


def _branches(fn: ast.AST, test_source: str) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """The body and else branch of the `if` in `fn` whose test reads `test_source`."""
    for node in ast.walk(fn):
        if isinstance(node, ast.If) and ast.unparse(node.test) == test_source:
            return node.body, node.orelse
    raise AssertionError(f"no `if {test_source}` in the pinned {fn.name}")


def _assigns_regenerated_rid(nodes: list[ast.stmt]) -> bool:
    """Whether `nodes` assign `<x>.rid = <y>.regenerate_rid()` (the request goes on under a fresh uuid)."""
    return any(
        isinstance(n, ast.Assign)
        and ast.unparse(n.targets[0]).endswith(".rid")
        and ast.unparse(n.value).endswith(".regenerate_rid()")
        for stmt in nodes
        for n in ast.walk(stmt)
    )


def _pinned_abort_request():
    """TokenizerManager.abort_request from the pinned source, with the scheduler dispatch recorded."""
    namespace: dict = {
        "AbortReq": lambda rid, abort_all: ("abort", rid, abort_all),
        "get_serving": lambda: types.SimpleNamespace(tokenizer_worker_num=1),
        "logger": types.SimpleNamespace(warning=lambda *a: None),
    }
    fn = _method(TOKENIZER_MANAGER, "TokenizerManager", "abort_request")
    exec(compile(ast.Module([fn], []), str(TOKENIZER_MANAGER), "exec"), namespace)  # noqa: S102
    return namespace["abort_request"]


def _manager(rids) -> types.SimpleNamespace:
    dispatched: list = []
    return types.SimpleNamespace(
        rid_to_state={r: types.SimpleNamespace(abort_sent=False) for r in rids},
        _dispatch_to_scheduler=dispatched.append,
        enable_metrics=False,
        dispatched=dispatched,
    )


def test_an_abort_reaches_every_sample_under_the_pinned_rid_handling(api):
    """Read from the pinned tokenizer_manager.py: an n > 1 request's samples go on under fresh uuid rids
    (regenerate_rid in the parallel-sampling branch), while an n = 1 request keeps the client's rid; and
    abort_request with an rid the manager does not hold returns without telling the scheduler. So aborting
    an n > 1 request by the client's rid reaches nothing, and the client sends one n = 1 request per sample:
    each abort it sends (checked against io_struct.AbortReq by the contract server) reaches its sample."""
    handle = _method(TOKENIZER_MANAGER, "TokenizerManager", "_handle_batch_request")
    single, parallel = _branches(handle, "getattr(obj, 'parallel_sample_num', 1) == 1")
    assert _assigns_regenerated_rid(parallel) and not _assigns_regenerated_rid(single)
    regenerate = _method(IO_STRUCT, "GenerateReqInput", "regenerate_rid")
    namespace: dict = {"uuid": __import__("uuid")}
    exec(compile(ast.Module([regenerate], []), str(IO_STRUCT), "exec"), namespace)  # noqa: S102
    sample = types.SimpleNamespace(rid="p7-tag_0")
    assert namespace["regenerate_rid"](sample) != "p7-tag_0" and re.fullmatch(r"[0-9a-f]{32}", sample.rid)
    abort_request = _pinned_abort_request()

    # the old client: one n = 3 request under "p7-tag"; the manager holds the samples' uuid rids only
    old = _manager([sample.rid, "0" * 32, "1" * 32])
    abort_request(old, rid="p7-tag")
    assert old.dispatched == []

    async def run():
        async with ContractServer(api) as server:
            client = SGLangEngine(server.url, engine_id="c")
            await client.generate("p7", [5, 6, 7], 3, PARAMS)
            rids = [b["rid"] for _, path, b in server.requests if path == "/generate"]
            for rid in rids:  # what the client sends when it cancels a sample's request
                await client._abort_quietly(rid)
            await client.close()
        aborts = [b["rid"] for _, path, b in server.requests if path == "/abort_request"]
        return server, rids, aborts

    server, rids, aborts = asyncio.run(run())
    assert not server.errors, server.errors
    assert len(set(rids)) == 3 and aborts == rids
    new = _manager(rids)  # n = 1 requests: the manager holds the client's rids as sent
    for rid in aborts:
        abort_request(new, rid=rid)
    assert new.dispatched == [("abort", rid, False) for rid in rids]


def test_an_n_gt_1_request_answers_a_list_of_n_results_as_pinned():
    """Read from the pinned tokenizer_manager.py: with parallel sampling, one response generator per sample
    (inside `for _ in range(obj.parallel_sample_num)`) and the non-streaming reply is the list
    `_collect_batch_responses` gathers from them, an aborted sample being one of its entries (so the CPU
    server answers an aborted n > 1 request with n results)."""
    handle = _method(TOKENIZER_MANAGER, "TokenizerManager", "_handle_batch_request")
    _, parallel = _branches(handle, "getattr(obj, 'parallel_sample_num', 1) == 1")
    per_sample = [
        n
        for stmt in parallel
        for n in ast.walk(stmt)
        if isinstance(n, ast.For) and ast.unparse(n.iter) == "range(obj.parallel_sample_num)"
    ]
    assert per_sample and "generators.append(self._wait_one_response(" in ast.unparse(per_sample[0])
    (not_streaming,) = [
        n for n in ast.walk(handle) if isinstance(n, ast.If) and ast.unparse(n.test) == "not is_stream"
    ]
    assert [ast.unparse(n) for n in not_streaming.body] == [
        "outputs = await self._collect_batch_responses(generators)",
        "yield outputs",
    ]
    collect = ast.unparse(_method(TOKENIZER_MANAGER, "TokenizerManager", "_collect_batch_responses"))
    assert "return await asyncio.gather(*tasks)" in collect
