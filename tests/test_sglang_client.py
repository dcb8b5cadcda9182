"""SGLang client against SGLang's native API schema, served by the real LocalEngine (real tokens and log-probs).

The request fields checked here are those of SGLang's GenerateReqInput and sampling params
(python/sglang/srt/managers/io_struct.py, sampling/sampling_params.py); a GPU test runs a real server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from aiohttp import web
from safetensors.torch import save_file

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.net import free_port, is_healthy
from megatron_m2po.rollout.engines.base import EngineError, EngineReplyError, EngineRequestError
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.engines.local_server import LocalSGLangServer
from megatron_m2po.rollout.engines.sglang import SGLangEngine, parse_generate_reply, token_versions
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.types import SamplingParams

torch.set_num_threads(1)

# Field names of sglang's GenerateReqInput and SamplingParams that this client may send.
SGLANG_GENERATE_FIELDS = {
    "rid",
    "text",
    "input_ids",
    "sampling_params",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "stream",
    "return_text_in_logprobs",
}
SGLANG_SAMPLING_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_new_tokens",
    "min_new_tokens",
    "stop",
    "stop_token_ids",
    "n",
    "skip_special_tokens",
    "no_stop_trim",
    "sampling_seed",
    "ignore_eos",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=1)


class Served:
    """A LocalEngine behind the SGLang-schema server in this event loop, recording every request body."""

    def __init__(self, engine: LocalEngine):
        self.engine, self.requests = engine, []

    async def __aenter__(self):
        server = LocalSGLangServer(self.engine)

        @web.middleware
        async def record(request, handler):
            """Record the body after the handler read it (reading it first would leave it nothing to read)."""
            try:
                return await handler(request)
            finally:
                if request.body_exists:
                    self.requests.append((request.path, json.loads(await request.read() or b"{}")))

        server.app.middlewares.append(record)
        self.server = server
        self.runner = web.AppRunner(server.app)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


class RouterStandIn:
    """What sglang-router 0.3.2 does for the routes these tests touch (the contract test checks the pinned
    router has them): /server_info proxied to a worker, /health always 200 (liveness), /readiness 503 until a
    worker is registered, everything else 404."""

    def __init__(self, worker_url: str):
        self.worker_url, self.ready = worker_url, False

    async def __aenter__(self):
        import aiohttp

        self.session = aiohttp.ClientSession()

        async def server_info(request):
            async with self.session.get(f"{self.worker_url}/server_info") as r:
                return web.json_response(await r.json(), status=r.status)

        async def readiness(request):
            if self.ready:
                return web.json_response({"status": "ready", "healthy_workers": 1})
            return web.json_response({"status": "not ready", "reason": "no healthy workers"}, status=503)

        app = web.Application()
        app.router.add_get("/server_info", server_info)
        app.router.add_get("/health", lambda request: web.Response(text="OK"))
        app.router.add_get("/readiness", readiness)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
        await self.runner.cleanup()


def test_a_router_given_as_a_server_is_refused(hf_dir):
    """The router proxies /server_info (a worker's tp_size), so only a router-only route gives it away."""

    async def run():
        async with Served(LocalEngine(hf_dir)) as served, RouterStandIn(served.url) as router:
            server = SGLangEngine(served.url)
            await server.connect()
            wrong = SGLangEngine(router.url)
            with pytest.raises(EngineError, match="rollout.router_url"):
                await wrong.connect()
            await server.close()
            await wrong.close()

    asyncio.run(run())


def test_router_health_waits_for_its_readiness(hf_dir):
    """The router's /health answers 200 before any worker is registered; health() is its /readiness."""

    async def run():
        async with Served(LocalEngine(hf_dir)) as served, RouterStandIn(served.url) as router:
            engine = SGLangEngine(router.url, worker_urls=[served.url])
            before = await engine.health()
            router.ready = True
            after = await engine.health()
            await engine.close()
            return before, after

    assert asyncio.run(run()) == (False, True)


def _reference_logprobs(engine: LocalEngine, sample, temperature: float) -> torch.Tensor:
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = engine.model(ids).logits[0, len(sample.prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)


def test_group_is_one_request_per_sample_without_seed(hf_dir):
    """A group is n /generate requests with n = 1 and their own rids (so /abort_request reaches each: 0.5.23
    replaces the rids of an n > 1 request with uuids) and no sampling_seed (SGLang ignores it unless the
    server is deterministic, and then a fixed seed would give every group the same noise); real tokens and
    log-probs; per-token versions from meta_info.weight_versions."""
    engine = LocalEngine(hf_dir)

    async def run():
        async with Served(engine) as served:
            client = SGLangEngine(served.url, engine_id="sg")
            params = SamplingParams(
                max_new_tokens=12, temperature=0.8, top_p=0.95, top_k=30, seed=5, stop_token_ids=[7]
            )
            samples = await client.generate("q1", [40, 41, 42, 43], 3, params)
            assert await client.health()
            await client.close()
            return samples, served.requests

    samples, requests = asyncio.run(run())
    gen = [body for path, body in requests if path == "/generate"]
    assert len(gen) == 3 and len({body["rid"] for body in gen}) == 3
    for body in gen:
        assert set(body) <= SGLANG_GENERATE_FIELDS and set(body["sampling_params"]) <= SGLANG_SAMPLING_FIELDS
        assert body["return_logprob"] is True and body["input_ids"] == [40, 41, 42, 43]
        assert body["sampling_params"]["stop_token_ids"] == [7] and body["sampling_params"].get("n", 1) == 1
        assert "sampling_seed" not in body["sampling_params"]
    assert [s.group_index for s in samples] == [0, 1, 2]
    assert len({tuple(s.response_ids) for s in samples}) > 1  # independent draws, not one noise tape
    for s in samples:
        assert s.engine_id == "sg" and s.versions == [0] * len(s.response_ids)
        ref = _reference_logprobs(engine, s, 0.8)
        assert torch.allclose(torch.tensor(s.behavior_logprobs), ref, atol=1e-5, rtol=0)
        assert s.finish_reason in ("stop", "length")
        assert s.finish_reason == "length" or s.response_ids[-1] in (7, *engine._stop_ids)


def test_deterministic_client_needs_a_deterministic_server(hf_dir):
    """deterministic=True against a server without --enable-deterministic-inference (seeds ignored) is an
    error naming the config key, raised before any sample is drawn."""
    engine = LocalEngine(hf_dir)

    async def run():
        async with Served(engine) as served:
            client = SGLangEngine(served.url, engine_id="sg", deterministic=True)
            with pytest.raises(EngineError, match="rollout.sglang_deterministic"):
                await client.generate("q", [40, 41], 2, SamplingParams(max_new_tokens=4, seed=1))
            await client.close()
            return served.requests

    assert not [p for p, _ in asyncio.run(run()) if p == "/generate"]


GOOD = {
    "text": "ab",
    "output_ids": [5, 6],
    "meta_info": {
        "id": "r",
        "finish_reason": {"type": "length", "length": 2},
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "output_token_logprobs": [[-0.5, 5, None], [-1.25, 6, None]],
    },
}


def _mutate(path, value):
    reply = json.loads(json.dumps(GOOD))
    target = reply
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return reply


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("meta_info",), KeyError, "'meta_info'"),
        (("meta_info", "output_token_logprobs"), KeyError, "output_token_logprobs"),
        (
            ("meta_info", "output_token_logprobs"),
            [[-0.5, "x", None], [-1.0, 6, None]],
            r"output_token_logprobs\[0\]\[1\]",
        ),
        (
            ("meta_info", "output_token_logprobs"),
            [[-0.5, 5, None], [0.7, 6, None]],
            r"output_token_logprobs\[1\]\[0\]",
        ),
        (("meta_info", "finish_reason"), {"type": "done"}, "finish_reason"),
        (("meta_info", "completion_tokens"), 5, "completion_tokens"),
        (("output_ids",), [9, 9], "output_ids"),
    ],
)
def test_malformed_replies_name_the_field(path, value, field):
    assert parse_generate_reply(GOOD, "w")[:3] == ([5, 6], [-0.5, -1.25], "length")
    with pytest.raises(EngineReplyError, match=field):
        parse_generate_reply(_mutate(path, value), "http://x/generate")


@pytest.mark.parametrize(
    "spans,start,expected",
    [
        ([{"version": "3", "start": 0, "end": 1}, {"version": "4", "start": 1, "end": 2}], 3, [3, 4]),
        ([{"version": "default", "start": 0, "end": 2}], 7, [7, 7]),
        (None, 5, [5, 5]),
    ],
)
def test_weight_version_spans_become_per_token_versions(spans, start, expected):
    reply = json.loads(json.dumps(GOOD))
    if spans is not None:
        reply["meta_info"]["weight_versions"] = spans
    meta = parse_generate_reply(reply, "w")[3]
    assert token_versions(meta, 2, start, "w") == expected


@pytest.mark.parametrize(
    "spans,field",
    [
        ([{"version": "3", "start": 0, "end": 1}], "cover 1 tokens"),
        ([{"version": "3", "start": 1, "end": 2}], r"weight_versions\[0\]"),
        ([{"version": "v3", "start": 0, "end": 2}], "not an integer"),
    ],
)
def test_bad_weight_version_spans_name_the_field(spans, field):
    with pytest.raises(EngineReplyError, match=field):
        token_versions({"weight_versions": spans}, 2, 0, "w")


def test_aborted_before_the_first_token_is_an_empty_abort():
    """0.5.23 may answer an aborted request without output_token_logprobs: an abort, which the farm resubmits."""
    reply = {"text": "", "meta_info": {"id": "r", "finish_reason": {"type": "abort", "message": "aborted"}}}
    assert parse_generate_reply(reply, "w")[:3] == ([], [], "abort")


def test_server_refusals_are_bad_requests_or_failed_updates(hf_dir):
    """Against the real CPU server: a /generate it refuses (HTTP 400) is a bad request the farm does not retry
    elsewhere; a refused control call (HTTP 400 + success false) is an EngineError carrying the server's
    message, and a failed disk update leaves the version; a dead server is an EngineError and unhealthy."""
    engine = LocalEngine(hf_dir)

    async def run():
        async with Served(engine) as a, Served(LocalEngine(hf_dir)) as b:
            first, second = SGLangEngine(a.url, engine_id="a"), SGLangEngine(b.url, engine_id="b")
            farm = EngineFarm([first, second])
            with pytest.raises(EngineRequestError, match="max_new_tokens"):
                await farm.generate("p", [1, 2], 1, SamplingParams(max_new_tokens=10**9))
            assert farm.metrics()["rollout/farm_failures"] == 0
            with pytest.raises(EngineError, match="HTTP 400.*begin_weight_update"):
                await first._control(
                    "/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []}
                )
            with pytest.raises(EngineError, match="HTTP 400.*/nope"):
                await first.update_weights_from_disk("/nope", 3)
            assert first.version == 0 and await first.health()  # resumed after the failed update
            await farm.close()
        dead = SGLangEngine(f"http://127.0.0.1:{free_port()}")
        assert not await dead.health()
        with pytest.raises(EngineError, match="/server_info"):
            await dead.generate("p", [1, 2], 1, SamplingParams(max_new_tokens=2))
        await dead.close()

    asyncio.run(run())


def test_cpu_server_n_gt_1_abort_and_reply_as_pinned(hf_dir):
    """As 0.5.23 (tokenizer_manager.py replaces an n > 1 request's expanded rids with uuids; io_struct.py
    GenerateReqInput._normalize_rid): /abort_request with the client's rid reaches no sample, and an abort
    pause answers the n > 1 request with a list of n aborted results (200), without `index` (streaming only)."""
    import aiohttp

    async def run():
        async with Served(LocalEngine(hf_dir)) as served, aiohttp.ClientSession() as http:
            body = {
                "rid": "g",
                "input_ids": [3, 4, 5],
                "sampling_params": {"n": 3, "max_new_tokens": 4, "temperature": 1.0},
                "return_logprob": True,
            }
            await http.post(f"{served.url}/pause_generation", json={"mode": "retract"})
            request = asyncio.ensure_future(http.post(f"{served.url}/generate", json=body))
            await asyncio.sleep(0.3)
            await http.post(f"{served.url}/abort_request", json={"rid": "g"})
            await asyncio.sleep(0.2)
            assert not request.done() and "g" not in served.server.inflight
            await http.post(f"{served.url}/pause_generation", json={"mode": "abort"})
            reply = await request
            return reply.status, await reply.json()

    status, reply = asyncio.run(run())
    assert status == 200 and isinstance(reply, list) and len(reply) == 3
    assert [r["meta_info"]["finish_reason"]["type"] for r in reply] == ["abort"] * 3
    assert len({r["meta_info"]["id"] for r in reply}) == 3 and "g" not in {
        r["meta_info"]["id"] for r in reply
    }
    assert not any("index" in r for r in reply)
    assert [parse_generate_reply(r, "w")[2] for r in reply] == ["abort"] * 3


def test_pause_continue_abort_and_weights_from_disk(hf_dir, tmp_path):
    """Paused, the engine stays healthy (SGLang's /ready says 503, the client knows it paused it); a cancelled
    request is aborted on the server; a disk update while a request waits in a retract pause is accepted
    (its cache can be flushed) and the request finishes on the new weights with both versions recorded."""
    engine = LocalEngine(hf_dir)
    new = {k: v + 0.1 for k, v in engine.state_dict().items()}
    save_file({k: v.contiguous() for k, v in new.items()}, tmp_path / "model.safetensors")

    async def run():
        async with Served(engine) as served:
            client = SGLangEngine(served.url)
            params = SamplingParams(max_new_tokens=6, temperature=1.0)
            await client.pause()
            assert await client.health()
            task = asyncio.ensure_future(client.generate("p", [3, 4, 5], 2, params))
            await asyncio.sleep(0.3)
            assert not task.done() and len(served.server.inflight) == 2  # one request per sample
            task.cancel()  # the client aborts each sample's rid on the server
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(50):
                if not served.server.inflight:
                    break
                await asyncio.sleep(0.05)
            assert not served.server.inflight
            aborted = {body["rid"] for path, body in served.requests if path == "/abort_request"}
            assert aborted == {body["rid"] for path, body in served.requests if path == "/generate"}
            await client.resume()
            waiting = asyncio.ensure_future(client.generate("p", [3, 4, 5], 1, params))
            await client.update_weights_from_disk(str(tmp_path), version=4)
            assert client.version == 4 and engine.version == 4
            samples = await client.generate("p", [3, 4, 5], 1, params)
            before = (await waiting)[0]
            await client.close()
            return samples, before, served.requests

    samples, before, requests = asyncio.run(run())
    assert samples[0].versions == [4] * len(samples[0].response_ids)
    assert set(before.versions) <= {0, 4} and before.versions == sorted(before.versions)
    disk = [b for p, b in requests if p == "/update_weights_from_disk"]
    assert disk == [{"model_path": str(tmp_path), "weight_version": "4", "flush_cache": True}]
    assert [b for p, b in requests if p == "/pause_generation"] == [{"mode": "retract"}] * 2
    for k, v in new.items():
        assert torch.equal(engine.state_dict()[k], v)


@pytest.mark.slow
def test_update_group_rebuilt_when_an_engine_joins_or_dies(hf_dir, tmp_path):
    """The NCCL protocol on CPU (gloo) with two server processes: an engine that joins the farm after the
    start (with a stale update session left open) gets a new group and the next update; one that dies is
    left out of the next group, the other goes on. After each update the served log-probs are the trainer's."""
    from test_weight_sync import PARAMS, max_diff, trainer_logprobs

    from megatron_m2po.checkpoint import load_policy
    from megatron_m2po.models import load_hf_config
    from megatron_m2po.platform import destroy_distributed, init_distributed
    from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
    from megatron_m2po.sync import WeightSync
    from megatron_m2po.sync.broadcast import DistributedWeightBroadcaster

    def perturb(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))

    init_distributed()
    try:
        model, hf_config = load_policy(hf_dir, dtype=torch.float32), load_hf_config(hf_dir)
        with EngineLauncher(hf_dir, servers=2, backend="local", log_dir=tmp_path) as launcher:
            first, second = launcher.engines()
            farm = EngineFarm([first])
            broadcaster = DistributedWeightBroadcaster(
                [first], master_address="127.0.0.1", master_port=free_port(), backend="gloo"
            )
            sync = WeightSync(
                model, hf_config, farm, transport="distributed", broadcaster=broadcaster, bucket_bytes=1 << 20
            )

            def call(coro):
                return asyncio.run_coroutine_threadsafe(coro, sync.loop).result()

            async def join():
                await second._control("/begin_weight_update", {})  # left open by an interrupted update
                farm.add_engine(second)

            broadcaster.connect(sync.loop)
            perturb(model)
            sync.push_collective(1)
            assert (first.version, broadcaster.generation) == (1, 1)
            call(join())
            perturb(model)
            sync.push_collective(2)
            assert [e.engine_id for e in broadcaster.engines] == [first.engine_id, second.engine_id]
            assert (first.version, second.version, broadcaster.generation) == (2, 2, 2)
            for engine in (first, second):
                out = call(engine.generate("q", [40, 41, 42, 43], 2, PARAMS))
                assert max_diff(out, trainer_logprobs(model, out)) <= 1e-5
                assert all(s.versions == [2] * len(s.response_ids) for s in out)
            # restarted between health checks: it serves its start-up weights and has left the group;
            # begin_weight_update notices (/model_info) and the group is rebuilt with the same members
            restarted = restart(launcher, second, hf_dir)
            perturb(model)
            sync.push_collective(3)
            assert (first.version, second.version, broadcaster.generation) == (3, 3, 3)
            out = call(second.generate("q", [40, 41, 42, 43], 2, PARAMS))
            assert max_diff(out, trainer_logprobs(model, out)) <= 1e-5
            # restarted again, seen by a health check: healthy, but out of rotation until an update
            restarted = restart(launcher, second, hf_dir, restarted)
            assert call(farm.check_health()) == {first.engine_id: True, second.engine_id: True}
            assert second.version == 0 and not farm._slots[second.engine_id].synced
            os.killpg(restarted.pid, signal.SIGKILL)  # and gone for good: the next group leaves it out
            restarted.wait()
            assert call(farm.check_health()) == {first.engine_id: True, second.engine_id: False}
            perturb(model)
            sync.push_collective(4)
            assert [e.engine_id for e in broadcaster.engines] == [first.engine_id]
            assert (first.version, second.version, broadcaster.generation) == (4, 0, 4)
            out = call(farm.generate("r", [50, 51, 52], 2, PARAMS))
            assert max_diff(out, trainer_logprobs(model, out)) <= 1e-5
            call(farm.close())
            sync.close()
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_a_refused_bucket_takes_that_engine_out_not_the_update(hf_dir, tmp_path, caplog):
    """NCCL protocol on CPU (gloo): a server that receives a bucket but refuses it (400, success false: here
    its model has other parameter names) does not fail WeightSync.push_collective; it keeps its weights and version, the
    farm routes around it with the server's message logged, and the other engine serves the new weights."""
    from test_weight_sync import PARAMS, max_diff, trainer_logprobs

    from megatron_m2po.checkpoint import load_policy
    from megatron_m2po.models import load_hf_config
    from megatron_m2po.models.tiny import make_tiny_model
    from megatron_m2po.platform import destroy_distributed, init_distributed
    from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
    from megatron_m2po.sync import WeightSync
    from megatron_m2po.sync.broadcast import DistributedWeightBroadcaster

    other = make_tiny_model("llama", tmp_path / "llama", seed=2)
    init_distributed()
    try:
        model, hf_config = load_policy(hf_dir, dtype=torch.float32), load_hf_config(hf_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        with (
            EngineLauncher(hf_dir, servers=1, backend="local", log_dir=tmp_path / "a") as a,
            EngineLauncher(other, servers=1, backend="local", log_dir=tmp_path / "b") as b,
        ):
            (good,), (bad,) = a.engines(), b.engines()
            farm = EngineFarm([good, bad])
            broadcaster = DistributedWeightBroadcaster(  # the refused broadcast ends within `timeout`
                farm.engines, master_address="127.0.0.1", master_port=free_port(), backend="gloo", timeout=20
            )
            sync = WeightSync(
                model, hf_config, farm, transport="distributed", broadcaster=broadcaster, bucket_bytes=1 << 20
            )
            broadcaster.connect(sync.loop)
            with caplog.at_level("ERROR"):
                metrics = sync.push_collective(1)
            assert metrics["sync/version"] == 1 and (good.version, bad.version) == (1, 0)
            assert farm._slots[good.engine_id].synced and not farm._slots[bad.engine_id].synced
            assert f"{bad.url}/update_weights_from_distributed failed (HTTP 400)" in caplog.text
            out = asyncio.run_coroutine_threadsafe(
                farm.generate("q", [40, 41, 42], 2, PARAMS), sync.loop
            ).result()
            assert {s.engine_id for s in out} == {good.engine_id}
            assert max_diff(out, trainer_logprobs(model, out)) <= 1e-5
            asyncio.run_coroutine_threadsafe(farm.close(), sync.loop).result()
            sync.close()
    finally:
        destroy_distributed()


def restart(launcher, engine, hf_dir, previous=None):
    """Kill an engine's server process (the launcher's, or `previous`) and start a fresh one on its port."""
    old = previous or launcher.procs["server-1"]
    os.killpg(old.pid, signal.SIGKILL)
    old.wait()
    port = engine.url.rsplit(":", 1)[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_m2po.rollout.engines.local_server",
            "--model",
            str(hf_dir),
            "--port",
            port,
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not is_healthy(engine.url):
        assert proc.poll() is None and time.monotonic() < deadline, "the restarted server did not come up"
        time.sleep(0.2)
    return proc


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None or not torch.cuda.is_available(),
    reason="needs sglang==0.5.23 installed and a CUDA GPU",
)
def test_real_sglang_server_generate_and_weight_update_round_trip(hf_dir, tmp_path):
    """A real SGLang server on the tiny model: behaviour log-probs match HF's recompute; then new weights from
    disk (pause, update, flush, continue): the server's log-probs follow the new weights and tokens record
    the new version."""
    from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher

    new_dir = tmp_path / "v1"
    shutil.copytree(hf_dir, new_dir)  # tokenizer and config; the weights are overwritten below
    model = LocalEngine(hf_dir).model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(new_dir)
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    with EngineLauncher(
        hf_dir,
        servers=1,
        backend="sglang",
        log_dir=tmp_path,
        extra_args=["--dtype", "float32", "--mem-fraction-static", "0.3", "--disable-cuda-graph"],
    ) as launcher:
        client = launcher.engines()[0]

        async def run():
            before = await client.generate("q", [40, 41, 42, 43], 2, params)
            await client.update_weights_from_disk(str(new_dir), 1)
            after = await client.generate("q", [40, 41, 42, 43], 2, params)
            await client.close()
            return before, after

        before, after = asyncio.run(run())
    assert client.gpus == 1 and client.version == 1
    for samples, weights in ((before, LocalEngine(hf_dir)), (after, LocalEngine(str(new_dir)))):
        for s in samples:
            ref = _reference_logprobs(weights, s, 1.0)
            assert torch.allclose(torch.tensor(s.behavior_logprobs), ref, atol=2e-3)
    assert all(s.versions == [0] * len(s.response_ids) for s in before)
    assert all(s.versions == [1] * len(s.response_ids) for s in after)


def test_engines_cli_serves_until_sigterm(hf_dir, tmp_path):
    """`m2po engines --backend local`: prints the URLs once healthy, stops its servers on SIGTERM."""
    import urllib.request

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_m2po",
            "engines",
            "--model",
            str(hf_dir),
            "--backend",
            "local",
            "--base-port",
            str(port),
            "--log-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/get_server_info", timeout=10) as r:
            server_pid = json.loads(r.read())["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
