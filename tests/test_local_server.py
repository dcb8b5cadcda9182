"""The CPU engine server as a cluster client meets it: sglang 0.5.23's status codes, weight-update session and
API keys, validated input (400 naming the field, never a 500 or an empty 200) and all-or-nothing weight updates.

Every test talks HTTP to the real aiohttp app around a real LocalEngine on a tiny model.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.net import free_port
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.engines.local_server import (
    NOT_FLUSHED,
    LocalSGLangServer,
    _BadRequest,
    main,
    parse_sampling,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=2)


@pytest.fixture(scope="module")
def engine(hf_dir):
    eng = LocalEngine(hf_dir, engine_id="served")
    yield eng
    asyncio.run(eng.close())


@contextlib.asynccontextmanager
async def served(engine, **kwargs):
    """(server, base url, client session) for one test; the engine is shared, the server is fresh."""
    server = LocalSGLangServer(engine, **kwargs)
    port = free_port()
    runner = await server.start("127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as http:
            yield server, f"http://127.0.0.1:{port}", http
    finally:
        await runner.cleanup()


async def call(http, url, path, body=None, *, method="POST", key=None, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        kwargs = {"data": raw, "headers": {**headers, "Content-Type": "application/json"}}
    else:
        kwargs = {"json": body, "headers": headers}
    async with http.request(method, url + path, **kwargs) as r:
        text = await r.text()
        try:
            return r.status, await r.json(content_type=None)
        except ValueError:
            return r.status, text


def gen(sampling: dict, input_ids=(5, 6, 7)) -> dict:
    return {"input_ids": list(input_ids), "sampling_params": {"max_new_tokens": 4, **sampling}}


def error_message(reply) -> str:
    if isinstance(reply, dict):
        return reply.get("message") or reply.get("error", {}).get("message", "")
    return str(reply)


BAD_REQUESTS = [
    ("/generate", gen({"top_p": -1}), "top_p"),
    ("/generate", gen({"top_p": 1.5}), "top_p"),
    ("/generate", gen({"temperature": -0.5}), "temperature"),
    ("/generate", gen({"temperature": "hot"}), "temperature"),
    ("/generate", gen({"sampling_seed": "seven"}), "sampling_seed"),
    ("/generate", gen({"sampling_seed": 2**64}), "sampling_seed"),
    ("/generate", gen({"max_new_tokens": -3}), "max_new_tokens"),
    ("/generate", gen({"max_new_tokens": 100}), "max_new_tokens"),  # the server's cap is 32 below
    ("/generate", gen({"n": 0}), "n must"),
    ("/generate", gen({"n": 20000}), "n must"),
    ("/generate", gen({"top_k": 0}), "top_k"),
    ("/generate", gen({"stop_token_ids": ["x"]}), "stop_token_ids"),
    ("/generate", gen({"min_new_tokens": 9}), "min_new_tokens"),
    ("/generate", gen({"bogus": 1}), "bogus"),
    ("/generate", gen({}, input_ids=[1] * 4096), "context length"),  # the tiny model's 4096 positions
    ("/generate", gen({}, input_ids=[1, 10**9]), "input_ids"),
    ("/generate", gen({}, input_ids=[]), "input_ids"),
    ("/generate", [1, 2], "object"),
    ("/abort_request", [1, 2], "object"),
    ("/abort_request", "rid", "object"),
    ("/abort_request", {"rid": 5}, "rid"),
    ("/update_weights_from_disk", [1], "object"),
    ("/update_weights_from_disk", {"model_path": 3}, "model_path"),
    ("/update_weights_from_disk", {"model_path": "/x", "weight_version": "v2"}, "weight_version"),
    ("/pause_generation", {"mode": "halt"}, "mode"),
    ("/generate", gen({"temperature": 10**400}), "temperature"),  # float() overflows
    ("/generate", gen({"top_p": -(10**400)}), "top_p"),
    ("/update_weights_from_disk", {"model_path": "/x", "weight_version": 10**30}, "weight_version"),
    ("/update_weights_from_disk", {"model_path": "/x", "weight_version": -1}, "weight_version"),
    ("/init_weights_update_group", {"master_address": "h", "master_port": 1, "rank_offset": 1}, "world_size"),
    (
        "/init_weights_update_group",
        {"master_address": "h", "master_port": 99999, "world_size": 2},
        "master_port",
    ),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_REQUESTS)
def test_bad_requests_are_400_naming_the_field(engine, path, body, field):
    async def run():
        async with served(engine, max_new_tokens=32) as (_, url, http):
            return await call(http, url, path, body)

    status, reply = asyncio.run(run())
    assert status == 400, reply
    if path != "/generate":
        assert reply["success"] is False
    assert field in error_message(reply)


def test_non_json_body_is_400(engine):
    async def run():
        async with served(engine) as (_, url, http):
            return [await call(http, url, p, raw=b"{nope") for p in ("/generate", "/abort_request")]

    for status, reply in asyncio.run(run()):
        assert status == 400 and "not JSON" in error_message(reply)


HOSTILE_BODIES = [
    ("/generate", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # RecursionError in json
    ("/abort_request", b'{"rid": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    ("/generate", b'{"input_ids": [' + b"9" * 5000 + b"]}", "not JSON"),  # over int_max_str_digits
    (
        "/generate",
        b'{"input_ids": [1], "sampling_params": {"temperature": ' + b"9" * 400 + b"}}",
        "temperature",
    ),
    ("/update_weights_from_disk", b'{"model_path": "/x", "weight_version": Infinity}', "weight_version"),
    ("/update_weights_from_disk", b'{"model_path": "/x", "weight_version": NaN}', "weight_version"),
    (
        "/update_weights_from_distributed",
        b'{"names": ["a"], "dtypes": ["float32"], "shapes": [[1e400]]}',
        "shapes",
    ),
    (
        "/update_weights_from_distributed",
        b'{"names": ["a"], "dtypes": ["float32"], "shapes": [[-1]]}',
        "shapes",
    ),
    (
        "/update_weights_from_distributed",
        b'{"names": ["a"], "dtypes": ["Tensor"], "shapes": [[1]]}',
        "dtypes",
    ),
    (
        "/update_weights_from_distributed",
        b'{"names": ["a"], "dtypes": ["float32"], "shapes": [[99999999999]]}',
        "elements",
    ),
    ("/generate", b'{"input_ids": [1], "rid": "\xff"}', "not JSON"),
    ("/generate", b'{"input_ids": [1]}\xff', "not JSON"),  # not UTF-8
]


HOSTILE_IDS = [
    "deep-array",
    "deep-rid",
    "int-5000-digits",
    "temperature-400-digits",
    "version-infinity",
    "version-nan",
    "shape-1e400",
    "shape-negative",
    "dtype-not-torch",
    "shape-huge",
    "rid-not-utf8",
    "trailing-not-utf8",
]


@pytest.mark.parametrize(("path", "raw", "field"), HOSTILE_BODIES, ids=HOSTILE_IDS)
def test_hostile_json_is_400_naming_the_field(engine, path, raw, field):
    """Bodies that used to raise past the validation (RecursionError, OverflowError) into a 500."""

    async def run():
        async with served(engine) as (server, url, http):
            await call(http, url, "/begin_weight_update", {})  # so the distributed route reads its fields
            try:
                return await call(http, url, path, raw=raw)
            finally:
                await call(http, url, "/end_weight_update", {})

    status, reply = asyncio.run(run())
    assert status == 400, reply
    assert field in error_message(reply)
    assert len(error_message(reply)) < 400  # the value is not echoed back whole


async def raw_status(port: int, request: bytes) -> bytes:
    """The status line the server answers a hand-written request with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


def test_non_utf8_authorization_is_401(engine):
    async def run():
        async with served(engine, api_key="user-key") as (_, url, _http):
            port = int(url.rsplit(":", 1)[1])
            lines = []
            for header in (b"Bearer \xff\xfe", b"Bearer \xed\xa0\x80", b"\xff user-key"):
                request = b"POST /flush_cache HTTP/1.1\r\nHost: x\r\nAuthorization: " + header
                lines.append(await raw_status(port, request + b"\r\nContent-Length: 0\r\n\r\n"))
            return lines

    for line in asyncio.run(run()):
        assert line.startswith(b"HTTP/1.1 401"), line


@given(
    st.dictionaries(
        st.sampled_from(
            ["temperature", "top_p", "top_k", "max_new_tokens", "n", "sampling_seed", "stop_token_ids"]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**65), 2**65),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=3),
            st.lists(st.integers(-5, 200), max_size=3),
        ),
    )
)
@example({"temperature": 1e-45})
@example({"temperature": float("nan")})
@example({"n": True})
@example({})  # the default max_new_tokens (128) is clipped to the cap
@settings(max_examples=300, deadline=None)
def test_sampling_params_are_accepted_valid_or_refused_by_name(d):
    """Whatever JSON arrives, parsing either yields parameters the engine can run or a _BadRequest naming a key."""
    try:
        params, n = parse_sampling(d, vocab=100, max_n=8, max_new_cap=64)
    except _BadRequest as e:
        assert any(k in str(e) for k in d)
        return
    assert 1 <= n <= 8 and 0 <= params.max_new_tokens <= 64
    assert params.temperature == 0 or params.temperature >= 1e-6
    assert 0 < params.top_p <= 1 and (params.top_k == -1 or params.top_k >= 1)
    assert all(0 <= t < 100 for t in params.stop_token_ids)


def test_tiny_temperature_is_greedy_as_sglang(engine):
    """sglang treats 0 <= T < 1e-6 as greedy (a tiny positive T such as 1e-45 must not overflow into a 500)."""

    async def run():
        async with served(engine) as (_, url, http):
            tiny = await call(http, url, "/generate", gen({"temperature": 1e-45, "max_new_tokens": 6}))
            zero = await call(http, url, "/generate", gen({"temperature": 0, "max_new_tokens": 6}))
            return tiny, zero

    (s1, tiny), (s2, zero) = asyncio.run(run())
    assert s1 == s2 == 200
    assert tiny["output_ids"] == zero["output_ids"] and len(tiny["output_ids"]) == 6


def test_failed_update_keeps_old_weights_and_version(engine, tmp_path):
    """A bad tensor in the second shard: nothing of the update is served, and the version stays."""
    before = engine.state_dict()
    version = engine.version
    good = {k: v + 1.0 for k, v in before.items() if "layers.0." in k}
    save_file({k: v.contiguous() for k, v in good.items()}, tmp_path / "a.safetensors")
    save_file({"lm_head.weight": torch.zeros(3, 3)}, tmp_path / "b.safetensors")

    async def run():
        async with served(engine) as (_, url, http):
            update = await call(
                http, url, "/update_weights_from_disk", {"model_path": str(tmp_path), "weight_version": "7"}
            )
            return update, await call(http, url, "/model_info", method="GET")

    (status, reply), (_, info) = asyncio.run(run())
    assert status == 400 and reply["success"] is False and "lm_head.weight" in reply["message"]
    assert engine.version == version and info["weight_version"] == str(version)
    after = engine.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_failed_bucket_discards_the_whole_update(engine):
    """The streamed form (begin, buckets, finish) stages buckets: a failed one discards those before it too."""
    before = engine.state_dict()
    version = engine.version
    first = [(k, v + 1.0) for k, v in before.items() if "layers.0." in k]

    async def run():
        await engine.begin_weight_update(version + 1)
        await engine.update_weights_bucket(first)
        with pytest.raises(ValueError, match="lm_head.weight"):
            await engine.update_weights_bucket([("lm_head.weight", torch.zeros(2, 2))])
        await engine.finish_weight_update(version + 1)

    asyncio.run(run())
    assert engine.version == version
    assert all(torch.equal(engine.state_dict()[k], v) for k, v in before.items())


def test_successful_update_publishes_version(engine, tmp_path):
    new = {k: v * 1.01 for k, v in engine.state_dict().items()}
    save_file({k: v.contiguous() for k, v in new.items()}, tmp_path / "model.safetensors")
    target = engine.version + 3

    async def run():
        async with served(engine) as (_, url, http):
            update = await call(
                http,
                url,
                "/update_weights_from_disk",
                {"model_path": str(tmp_path), "weight_version": str(target)},
            )
            return update, await call(http, url, "/generate", gen({}))

    (status, reply), (_, out) = asyncio.run(run())
    assert status == 200 and reply["success"] is True
    assert engine.version == target and out["meta_info"]["weight_version"] == str(target)
    assert out["meta_info"]["weight_versions"] == [{"version": str(target), "start": 0, "end": 4}]
    assert all(torch.equal(engine.state_dict()[k], v) for k, v in new.items())


def test_weight_update_session_as_sglang(engine):
    """Outside begin/end an NCCL-style update is refused (and joins no broadcast); sessions do not nest."""
    bucket = {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[4, 4]]}

    async def run():
        async with served(engine) as (server, url, http):
            outside = await call(http, url, "/update_weights_from_distributed", bucket)
            end_alone = await call(http, url, "/end_weight_update", {})
            begin = await call(http, url, "/begin_weight_update", {})
            again = await call(http, url, "/begin_weight_update", {})
            health = await call(http, url, "/health", method="GET")
            probe = await call(http, url, "/health_generate", method="GET")
            no_group = await call(http, url, "/update_weights_from_distributed", bucket)
            end = await call(http, url, "/end_weight_update", {})
            return outside, end_alone, begin, again, health, probe, no_group, end, server.session

    outside, end_alone, begin, again, health, probe, no_group, end, session = asyncio.run(run())
    assert (
        outside[0] == 400 and "between begin_weight_update() and end_weight_update()" in outside[1]["message"]
    )
    assert end_alone[0] == 400 and "no weight-update session" in end_alone[1]["message"]
    assert begin == (200, {"success": True, "message": "Success"})
    assert again[0] == 400 and "already open" in again[1]["message"]
    assert (
        health[0] == 200 and probe[0] == 503
    )  # /health answers during an update; the generation probe cannot
    assert no_group[0] == 400 and "init_weights_update_group" in no_group[1]["message"]
    assert end[0] == 200 and session is None


def test_flush_refused_while_requests_run(engine, tmp_path):
    """sglang 0.5.23: /flush_cache and an update's flush_cache answer 400 while a request runs (an in_place
    pause keeps it running; a retract pause puts it back in the queue, and then the flush runs)."""
    save_file({k: v.contiguous() for k, v in engine.state_dict().items()}, tmp_path / "model.safetensors")
    version = engine.version

    async def run():
        async with served(engine) as (server, url, http):
            idle = await call(http, url, "/flush_cache")
            await call(http, url, "/pause_generation", {"mode": "in_place"})
            ready = await call(http, url, "/ready", method="GET")
            task = asyncio.ensure_future(call(http, url, "/generate", gen({"max_new_tokens": 8})))
            while not server.inflight:
                await asyncio.sleep(0.02)
            busy = await call(http, url, "/flush_cache", method="GET")
            update = await call(
                http, url, "/update_weights_from_disk", {"model_path": str(tmp_path), "weight_version": "40"}
            )
            unflushed = await call(
                http,
                url,
                "/update_weights_from_disk",
                {"model_path": str(tmp_path), "weight_version": "41", "flush_cache": False},
            )
            await call(http, url, "/pause_generation", {"mode": "retract"})
            retracted = await call(http, url, "/flush_cache", {})  # the request waits in the queue: flushable
            await call(http, url, "/continue_generation", {})
            done = await task
            return idle, ready, busy, update, unflushed, retracted, done

    idle, ready, busy, update, unflushed, retracted, done = asyncio.run(run())
    assert retracted[0] == 200
    assert idle[0] == 200 and ready[0] == 503
    assert busy == (400, "Flush cache failed.\n")
    assert update[0] == 400 and update[1]["message"] == NOT_FLUSHED  # loaded, as in sglang, but not flushed
    assert unflushed[0] == 200 and engine.version == 41 != version
    assert done[0] == 200 and len(done[1]["output_ids"]) == 8


def test_server_info_reports_tp_size(engine):
    async def run():
        async with served(engine) as (_, url, http):
            return [await call(http, url, p, method="GET") for p in ("/server_info", "/get_server_info")]

    (s1, info), (s2, alias) = asyncio.run(run())
    assert s1 == s2 == 200 and info["tp_size"] == 1 and alias["tp_size"] == 1
    assert info["context_length"] == 4096


def test_api_keys_as_sglang(engine):
    """--api-key guards every route but /health*; with --admin-api-key the control routes take only that key."""

    async def run():
        out = {}
        async with served(engine, api_key="user-key") as (_, url, http):
            out["none"] = await call(http, url, "/generate", gen({}))
            out["wrong"] = await call(http, url, "/generate", gen({}), key="nope")
            out["right"] = await call(http, url, "/generate", gen({}), key="user-key")
            out["control"] = await call(http, url, "/flush_cache", key="user-key")
            out["control_none"] = await call(http, url, "/pause_generation", {})
            out["health"] = await call(http, url, "/health", method="GET")
            out["info_none"] = await call(http, url, "/server_info", method="GET")
        async with served(engine, api_key="user-key", admin_api_key="admin-key") as (_, url, http):
            out["admin_with_user_key"] = await call(
                http, url, "/update_weights_from_disk", {}, key="user-key"
            )
            out["admin_with_admin_key"] = await call(http, url, "/continue_generation", {}, key="admin-key")
            out["generate_with_admin_key"] = await call(http, url, "/generate", gen({}), key="admin-key")
            out["generate_with_user_key"] = await call(http, url, "/generate", gen({}), key="user-key")
        return {k: v[0] for k, v in out.items()}

    assert asyncio.run(run()) == {
        "none": 401,
        "wrong": 401,
        "right": 200,
        "control": 200,
        "control_none": 401,
        "health": 200,
        "info_none": 401,
        "admin_with_user_key": 401,
        "admin_with_admin_key": 200,
        "generate_with_admin_key": 401,
        "generate_with_user_key": 200,
    }


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_non_loopback_bind_without_key_is_refused(hf_dir, host, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(hf_dir), "--host", host, "--port", "1"])
    assert f"refusing to listen on {host} without --api-key" in capsys.readouterr().err


TRAINER_RANK = """
import sys, torch
from safetensors.torch import load_file
from megatron_m2po.sync.process_group import broadcast_from_trainer, new_weight_update_group
group = new_weight_update_group("127.0.0.1", int(sys.argv[1]), 0, 2, "g", "gloo")
tensors = load_file(sys.argv[2])
for name in sys.argv[3:]:  # in the order the server is told about them
    broadcast_from_trainer(group, tensors[name].contiguous())
torch.distributed.destroy_process_group(group)
# The exit status says whether every broadcast went through. Skip the interpreter's C++ teardown: the store this
# rank hosts and gloo's threads are torn down while the server may still be in the group, and twice in CI
# (under load) that teardown aborted the finished process (-6, 'terminate called without an active exception').
import os; os._exit(0)
"""


def test_failed_broadcast_bucket_keeps_old_weights_and_version(engine, tmp_path):
    """The NCCL path on gloo, the trainer's rank in its own process: a good bucket, then one announced with a
    wrong shape. The server still takes part in the broadcast (the trainer is not left hanging), answers 400,
    and the session ends with nothing applied."""
    import subprocess
    import sys

    before, version = engine.state_dict(), engine.version
    good_name = next(k for k in before if "layers.0." in k)
    buckets = {good_name: before[good_name] + 1.0, "lm_head.weight": torch.zeros(3, 3)}
    save_file(buckets, tmp_path / "buckets.safetensors")
    port = free_port()
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER_RANK, str(port), str(tmp_path / "buckets.safetensors"), *buckets]
    )

    async def run():
        async with served(engine) as (_, url, http):
            group = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}
            assert (await call(http, url, "/init_weights_update_group", {**group, "group_name": "g"}))[
                0
            ] == 200
            await call(http, url, "/begin_weight_update", {})
            replies = []
            for name in buckets:  # the good bucket, then the bad one
                body = {"names": [name], "dtypes": ["float32"], "shapes": [list(buckets[name].shape)]}
                body |= {"group_name": "g", "flush_cache": False, "weight_version": str(version + 1)}
                replies.append(await call(http, url, "/update_weights_from_distributed", body))
            return replies, await call(http, url, "/end_weight_update", {})

    try:
        (first, second), end = asyncio.run(run())
        assert trainer.wait(timeout=60) == 0
    finally:
        trainer.kill()
    assert first[0] == 200 and second[0] == 400 and "lm_head.weight" in second[1]["message"]
    assert end[0] == 400 and f"still serving version {version}" in end[1]["message"]
    assert engine.version == version
    assert all(torch.equal(engine.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("complete", [False, True], ids=["last_bucket_missing", "every_bucket"])
def test_distributed_update_publishes_only_a_complete_set(engine, tmp_path, complete):
    """The trainer fails after all but the last bucket and the session is closed (SGLang has no route to drop
    one): end_weight_update answers 400 naming what is missing, and the old weights and version keep serving.
    With every bucket sent the same update is published."""
    import subprocess
    import sys

    before, version = engine.state_dict(), engine.version
    new = {k: v * 1.5 + 0.01 for k, v in before.items()}
    last = [k for k in new if "layers.0." in k]
    buckets = [[k for k in new if k not in last], last]
    sent = buckets if complete else buckets[:-1]
    save_file({k: v.contiguous() for k, v in new.items()}, tmp_path / "new.safetensors")
    port, name = free_port(), f"complete-set-{complete}"  # group names are process-wide
    names = [k for bucket in sent for k in bucket]
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            TRAINER_RANK.replace('"g"', repr(name)),
            str(port),
            str(tmp_path / "new.safetensors"),
            *names,
        ]
    )
    probe = {**gen({"temperature": 0, "max_new_tokens": 1}), "return_logprob": True}

    async def run():
        async with served(engine) as (_, url, http):
            _, first = await call(http, url, "/generate", probe)
            group = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}
            assert (await call(http, url, "/init_weights_update_group", {**group, "group_name": name}))[
                0
            ] == 200
            await call(http, url, "/begin_weight_update", {})
            for bucket in sent:
                body = {
                    "names": bucket,
                    "dtypes": [str(new[k].dtype).removeprefix("torch.") for k in bucket],
                    "shapes": [list(new[k].shape) for k in bucket],
                    "group_name": name,
                    "flush_cache": False,
                    "weight_version": str(version + 1),
                }
                assert (await call(http, url, "/update_weights_from_distributed", body))[0] == 200
            end = await call(http, url, "/end_weight_update", {})
            await call(http, url, "/destroy_weights_update_group", {"group_name": name})
            _, info = await call(http, url, "/model_info", method="GET")
            _, second = await call(http, url, "/generate", probe)
            return first, end, info, second

    try:
        first, end, info, second = asyncio.run(run())
        assert trainer.wait(timeout=60) == 0
    finally:
        trainer.kill()
    logprob = [out["meta_info"]["output_token_logprobs"] for out in (first, second)]
    if complete:
        assert end[0] == 200 and info["weight_version"] == str(version + 1) == str(engine.version)
        assert all(torch.equal(engine.state_dict()[k], v) for k, v in new.items())
        assert logprob[0] != logprob[1]
    else:
        assert end[0] == 400 and f"still serving version {version}" in end[1]["message"]
        assert f"lacks {len(last)} of" in end[1]["message"] and sorted(last)[0] in end[1]["message"]
        assert info["weight_version"] == str(version) == str(engine.version)
        assert all(torch.equal(engine.state_dict()[k], v) for k, v in before.items())
        assert logprob[0] == logprob[1]
