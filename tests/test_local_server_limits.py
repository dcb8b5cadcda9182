"""The CPU engine server against hostile or broken clients: weight updates that fail leave nothing behind on
every path, slow and many clients cannot lock others out, big bodies and odd files cannot stall the event
loop, update groups cannot take the server's threads, and /health answers throughout.

Every test talks HTTP (or raw TCP) to the real aiohttp app around a real LocalEngine on a tiny model, with
short limits so that each runs in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest
import torch
from safetensors.torch import save_file

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout.engines.http_guard import limit_log_rate
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.engines.local_server import LocalSGLangServer, main
from megatron_m2po.rollout.engines.server_limits import FD_RESERVE, ServerLimits, file_limit
from megatron_m2po.rollout.engines.sglang_launcher import free_port
from megatron_m2po.sync.process_group import bind_gloo_to

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(180)

# Generous for a shared CI machine: before these fixes /health stalled for the whole parse of every body, the
# server hung on a FIFO until a writer came, and control routes waited for the rendezvous timeout.
LATENCY_BOUND_S = 5.0
GREEDY = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def engine(hf_dir):
    eng = LocalEngine(hf_dir, engine_id="hardened")
    yield eng
    asyncio.run(eng.close())


@contextlib.asynccontextmanager
async def served(engine, **limits):
    server = LocalSGLangServer(engine, limits=ServerLimits(**limits))
    port = free_port()
    runner = await server.start("127.0.0.1", port)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            yield server, f"http://127.0.0.1:{port}", http
    finally:
        await runner.cleanup()


async def call(http, url, path, body=None, *, method="POST", raw=None):
    kwargs = (
        {"data": raw, "headers": {"Content-Type": "application/json"}} if raw is not None else {"json": body}
    )
    async with http.request(method, url + path, **kwargs) as r:
        text = await r.text()
        try:
            return r.status, await r.json(content_type=None)
        except ValueError:
            return r.status, text


async def served_state(http, url) -> tuple[str, list[int]]:
    """What a client sees of the weights: the version and a greedy generation."""
    _, info = await call(http, url, "/model_info", method="GET")
    _, out = await call(http, url, "/generate", GREEDY)
    return info["weight_version"], out["output_ids"]


async def health_latencies(url: str, until: asyncio.Future, period: float = 0.05) -> list[float]:
    """Seconds each /health took, polled on its own connections until `until` is done."""
    times = []
    async with aiohttp.ClientSession() as http:
        while not until.done():
            t0 = time.perf_counter()
            async with http.get(url + "/health") as r:
                assert r.status == 200
            times.append(time.perf_counter() - t0)
            await asyncio.sleep(period)
    return times


def shifted(engine, delta: float) -> dict[str, torch.Tensor]:
    return {k: (v + delta).contiguous() for k, v in engine.state_dict().items()}


# -- item: every update path is all or nothing -----------------------------------------------------------
def write_shards(directory, tensors: dict[str, torch.Tensor], corrupt: str) -> None:
    """Two shards, the last (in the order the engine reads them) damaged as `corrupt` says."""
    names = sorted(tensors)
    first, last = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({k: tensors[k] for k in first}, directory / "model-00001.safetensors")
    path = directory / "model-00002.safetensors"
    save_file({k: tensors[k] for k in last}, path)
    data = path.read_bytes()
    if corrupt == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif corrupt == "garbage_header":
        path.write_bytes(b"\xff" * 8 + data[8:])
    elif corrupt == "wrong_shape":
        save_file({**{k: tensors[k] for k in last[1:]}, last[0]: torch.zeros(3, 3)}, path)
    elif corrupt == "unknown_name":
        save_file({**{k: tensors[k] for k in last}, "model.bogus.weight": torch.zeros(1)}, path)
    elif corrupt == "missing_weights":
        path.unlink()


@pytest.mark.parametrize(
    "corrupt", ["truncated", "garbage_header", "wrong_shape", "unknown_name", "missing_weights"]
)
def test_disk_update_with_a_bad_last_shard_changes_nothing(engine, tmp_path, corrupt):
    """The first shard is good and loads; the last is bad: 400, and the version and outputs are as before."""
    write_shards(tmp_path, shifted(engine, 0.5), corrupt)
    before = engine.state_dict()

    async def run():
        async with served(engine) as (_, url, http):
            state = await served_state(http, url)
            reply = await call(
                http, url, "/update_weights_from_disk", {"model_path": str(tmp_path), "weight_version": "90"}
            )
            return state, reply, await served_state(http, url)

    state, (status, reply), after = asyncio.run(run())
    assert after == state and state[0] != "90"  # the version, and greedy outputs
    assert all(torch.equal(engine.state_dict()[k], v) for k, v in before.items())
    assert status == 400 and reply["success"] is False
    where = "model-00002" if corrupt != "missing_weights" else "lacks"
    assert where in reply["message"], reply["message"]


def test_disk_update_with_one_corrupt_file_changes_nothing(engine, tmp_path):
    tensors = shifted(engine, 0.25)
    save_file(tensors, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:100] + b"\x00" * 64 + data[164:])

    async def run():
        async with served(engine) as (_, url, http):
            state = await served_state(http, url)
            reply = await call(http, url, "/update_weights_from_disk", {"model_path": str(tmp_path)})
            return state, reply, await served_state(http, url)

    state, (status, reply), after = asyncio.run(run())
    assert after == state
    assert status == 400 and "model.safetensors" in reply["message"]


def test_tensor_update_with_a_bad_last_bucket_changes_nothing(engine):
    """The in-process path (WeightSync's "tensors"): buckets stage, the last one fails, finish discards all."""
    tensors = shifted(engine, 0.5)
    names = sorted(tensors)

    def torn():  # the last bucket's source fails halfway
        yield names[-1], tensors[names[-1]]
        raise OSError("the sender's copy broke off")

    async def run():
        version = engine.version
        outputs = []
        for last in ([(names[-1], torch.zeros(2, 2))], torn()):
            await engine.begin_weight_update(version + 1)
            await engine.update_weights_bucket([(n, tensors[n]) for n in names[:-1]])
            with pytest.raises((ValueError, OSError)):
                await engine.update_weights_bucket(last)
            await engine.finish_weight_update(version + 1)
            [sample] = await engine.generate("p", GREEDY["input_ids"], 1, _greedy_params())
            outputs.append((engine.version, sample.response_ids))
        return version, outputs

    before = engine.state_dict()
    [reference] = asyncio.run(engine.generate("p", GREEDY["input_ids"], 1, _greedy_params()))
    version, outputs = asyncio.run(run())
    assert outputs == [(version, reference.response_ids)] * 2
    assert all(torch.equal(engine.state_dict()[k], v) for k, v in before.items())


def _greedy_params():
    from megatron_m2po.types import SamplingParams

    return SamplingParams(max_new_tokens=8, temperature=0.0)


TRAINER_DIES = """
import os, sys, torch
from megatron_m2po.sync.process_group import broadcast_from_trainer, new_weight_update_group
group = new_weight_update_group("127.0.0.1", int(sys.argv[1]), 0, 2, "dies", "gloo")
broadcast_from_trainer(group, torch.full((int(sys.argv[2]),), 0.5))  # the first bucket
sys.stdout.write("sent\\n"); sys.stdout.flush()
sys.stdin.readline()  # the test says when
os._exit(3)  # dies before the last bucket
"""


def test_broadcast_that_breaks_off_changes_nothing(engine, monkeypatch):
    """The distributed path on gloo: the trainer sends the first bucket, then dies before the last. The
    server answers 400, the session ends discarded, the version and outputs are as before; the server's gloo
    sockets listened on its bind address (loopback) only."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "")
    assert bind_gloo_to("127.0.0.1") == "lo"
    first = next(k for k in sorted(engine.state_dict()) if engine.state_dict()[k].dim() == 1)
    numel = engine.state_dict()[first].numel()
    port = free_port()
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER_DIES, str(port), str(numel)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    async def run():
        async with served(engine) as (_, url, http):
            try:
                return await steps(http, url)
            finally:
                trainer.kill()  # unblocks the reader thread whatever happened

    async def steps(http, url):
        state = await served_state(http, url)
        group = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}
        joined = await call(http, url, "/init_weights_update_group", {**group, "group_name": "dies"})
        assert joined[0] == 200, joined
        listening = {
            c.laddr.ip for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN
        }
        await call(http, url, "/begin_weight_update", {})
        common = {"dtypes": ["float32"], "group_name": "dies", "flush_cache": False, "weight_version": "77"}
        good = await call(
            http,
            url,
            "/update_weights_from_distributed",
            {"names": [first], "shapes": [[numel]], **common},
        )
        assert await asyncio.to_thread(trainer.stdout.readline) == "sent\n"
        trainer.stdin.write("go\n")
        trainer.stdin.flush()
        broken = await call(
            http,
            url,
            "/update_weights_from_distributed",
            {"names": [first], "shapes": [[numel]], **common},
        )
        end = await call(http, url, "/end_weight_update", {})
        destroyed = await call(http, url, "/destroy_weights_update_group", {"group_name": "dies"})
        return state, listening, good, broken, end, destroyed, await served_state(http, url)

    state, listening, good, broken, end, destroyed, after = asyncio.run(run())
    assert listening == {"127.0.0.1"}, listening
    assert good[0] == 200 and broken[0] == 400 and "broadcast failed" in broken[1]["message"]
    assert end[0] == 400 and "discarded" in end[1]["message"]
    assert after == state and state[0] != "77"
    assert destroyed[0] == 200


# -- item: slow and many clients -------------------------------------------------------------------------
async def slow_client(port: int, stop: asyncio.Event) -> tuple[float, bytes]:
    """Send a request head a few bytes at a time; returns when and how the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 4000
    try:
        for i in range(0, len(head), 4):
            if stop.is_set() or reader.at_eof():
                break
            writer.write(head[i : i + 4])
            await writer.drain()
            with contextlib.suppress(asyncio.TimeoutError):
                data = await asyncio.wait_for(reader.read(200), 0.1)
                return time.perf_counter() - t0, data
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.perf_counter() - t0, b""


def test_slow_headers_are_timed_out_and_others_still_served(engine):
    """60 clients trickle their request heads at a server capped at 30 connections with a 1 s head deadline:
    each is closed by the deadline or to make room, normal requests are served on time meanwhile, and the log
    stays small."""
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.DEBUG)
    limit_log_rate()
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)

    async def run():
        async with served(engine, header_timeout_s=1.0, max_connections=30) as (server, url, http):
            port = int(url.rsplit(":", 1)[1])
            stop = asyncio.Event()
            slow = [asyncio.ensure_future(slow_client(port, stop)) for _ in range(60)]
            await asyncio.sleep(0.3)
            served_in = []
            for _ in range(5):
                t0 = time.perf_counter()
                async with aiohttp.ClientSession() as fresh:  # a new connection each time
                    status, _ = await call(fresh, url, "/generate", GREEDY)
                served_in.append((status, time.perf_counter() - t0))
                await asyncio.sleep(0.2)
            closed = await asyncio.wait_for(asyncio.gather(*slow), 30)
            stop.set()
            return served_in, closed, server.guard

    try:
        served_in, closed, guard = asyncio.run(run())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert all(status == 200 and seconds < 10 for status, seconds in served_in), served_in
    assert all(seconds < 10 for seconds, _ in closed), sorted(s for s, _ in closed)[-5:]
    assert {data.split(b"\r\n")[0] for _, data in closed} <= {
        b"HTTP/1.1 408 Request Timeout",
        b"HTTP/1.1 503 Service Unavailable",
        b"",
    }
    assert guard.timed_out + guard.evicted >= 60
    assert len(log.getvalue()) < 20_000, log.getvalue()[-2000:]


def test_slow_body_is_timed_out(engine):
    async def run():
        async with served(engine, body_timeout_s=1.0) as (_, url, http):
            port = int(url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.perf_counter()
            writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            return line, time.perf_counter() - t0, await call(http, url, "/generate", GREEDY)

    line, seconds, (status, _) = asyncio.run(run())
    assert line.startswith(b"HTTP/1.1 408") and 0.9 < seconds < 5
    assert status == 200


def test_limits_are_validated_naming_the_flag(hf_dir, capsys):
    for flags, message in [
        (["--header-timeout", "0"], "--header-timeout"),
        (["--body-timeout", "nan"], "--body-timeout"),
        (["--max-body-mb", "-1"], "--max-body-mb"),
        (["--max-connections", str(file_limit())], "--max-connections"),
        (["--rendezvous-timeout", "inf"], "--rendezvous-timeout"),
    ]:
        with pytest.raises(SystemExit):
            main(["--model", str(hf_dir), "--port", "1", *flags])
        assert message in capsys.readouterr().err
    assert ServerLimits().connection_cap <= file_limit() - FD_RESERVE


# -- item: work off the event loop -----------------------------------------------------------------------
def test_huge_bodies_are_refused_and_health_answers(engine):
    """Bodies over --max-body-mb get 413 without being read; bodies under it are parsed off the event loop;
    /health answers within a bound all the while."""
    big = b'{"input_ids": [' + b"5," * (6 << 20) + b'5], "sampling_params": {"max_new_tokens": 1}}'  # 12 MB
    near = b'{"input_ids": [' + b"5," * (3 << 20) + b'5], "sampling_params": {"max_new_tokens": 1}}'  # 6 MB

    async def run():
        async with served(engine) as (_, url, http):
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            health = asyncio.ensure_future(health_latencies(url, done))
            await asyncio.sleep(0.2)
            replies = await asyncio.gather(
                *(call(http, url, "/generate", raw=body) for body in (big, big, near, near, near))
            )
            done.set_result(None)
            return replies, await health

    replies, latencies = asyncio.run(run())
    statuses = [status for status, _ in replies]
    assert statuses == [413, 413, 400, 400, 400], statuses
    assert "--max-body-mb" in replies[0][1]["error"]["message"]
    assert "context length" in replies[2][1]["error"]["message"]
    assert len(latencies) >= 3 and max(latencies) < LATENCY_BOUND_S, latencies


def test_fifo_shard_is_refused_and_health_answers(engine, tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")

    async def run():
        async with served(engine) as (_, url, http):
            done = asyncio.get_running_loop().create_future()
            health = asyncio.ensure_future(health_latencies(url, done))
            t0 = time.perf_counter()
            reply = await asyncio.wait_for(
                call(http, url, "/update_weights_from_disk", {"model_path": str(tmp_path)}), 20
            )
            seconds = time.perf_counter() - t0
            done.set_result(None)
            return reply, seconds, await health

    (status, reply), seconds, latencies = asyncio.run(run())
    assert status == 400 and "not a regular file" in reply["message"] and seconds < 5
    assert max(latencies, default=0) < LATENCY_BOUND_S


def test_disk_update_reads_off_the_event_loop(engine, tmp_path):
    """A successful update from disk: /health keeps answering while the shards are read."""
    save_file(shifted(engine, 0.0), tmp_path / "model.safetensors")

    async def run():
        async with served(engine) as (_, url, http):
            done = asyncio.get_running_loop().create_future()
            health = asyncio.ensure_future(health_latencies(url, done, period=0.01))
            replies = [
                await call(http, url, "/update_weights_from_disk", {"model_path": str(tmp_path)})
                for _ in range(5)
            ]
            done.set_result(None)
            return replies, await health

    replies, latencies = asyncio.run(run())
    assert all(status == 200 for status, _ in replies)
    assert max(latencies) < LATENCY_BOUND_S, latencies


# -- item: update groups ---------------------------------------------------------------------------------
def test_forming_groups_do_not_starve_control_routes(engine, tmp_path):
    """Six /init_weights_update_group calls toward a rendezvous nobody hosts: one forms (until the 3 s
    rendezvous timeout), the other five are refused at once, and pause, continue, a session and a disk
    update answer within a second meanwhile. Rank 0 (the trainer's, which hosts the rendezvous) is refused."""
    save_file(shifted(engine, 0.0), tmp_path / "model.safetensors")
    port = free_port()  # nobody listens there
    group = {"master_address": "127.0.0.1", "master_port": port, "world_size": 2, "rank_offset": 1}

    async def run():
        async with served(engine, rendezvous_timeout_s=3.0) as (_, url, http):
            t0 = time.perf_counter()
            joins = [
                asyncio.ensure_future(
                    call(http, url, "/init_weights_update_group", {**group, "group_name": f"g{i}"})
                )
                for i in range(6)
            ]
            await asyncio.sleep(0.3)
            control = []
            for path, body in [
                ("/pause_generation", {"mode": "retract"}),
                ("/continue_generation", {}),
                ("/begin_weight_update", {}),
                ("/end_weight_update", {}),
                ("/update_weights_from_disk", {"model_path": str(tmp_path), "flush_cache": False}),
            ]:
                c0 = time.perf_counter()
                status, _ = await asyncio.wait_for(call(http, url, path, body), 10)
                control.append((path, status, time.perf_counter() - c0))
            replies = await asyncio.gather(*joins)
            rank0 = await call(http, url, "/init_weights_update_group", {**group, "rank_offset": 0})
            return control, replies, time.perf_counter() - t0, rank0

    control, replies, seconds, rank0 = asyncio.run(run())
    assert all(status == 200 and s < LATENCY_BOUND_S for _, status, s in control), control
    messages = [reply["message"] for _, reply in replies]
    assert all(status == 400 for status, _ in replies)
    assert sum("still forming" in m for m in messages) == 5, messages
    assert sum("Timeout" in m or "timed out" in m.lower() for m in messages) == 1, messages
    assert seconds < 30
    assert rank0[0] == 400 and "rank_offset" in rank0[1]["message"]


# -- item: abort by rid -----------------------------------------------------------------------------------
def test_duplicate_inflight_rid_is_refused(engine):
    async def run():
        async with served(engine) as (server, url, http):
            await call(http, url, "/pause_generation", {"mode": "in_place"})
            body = {**GREEDY, "rid": "same"}
            first = asyncio.ensure_future(call(http, url, "/generate", body))
            while "same" not in server.inflight:
                await asyncio.sleep(0.02)
            second = await call(http, url, "/generate", body)
            await call(http, url, "/abort_request", {"rid": "same"})
            await call(http, url, "/continue_generation", {})
            aborted = await first
            again = await call(http, url, "/generate", body)  # free again once the first is gone
            return second, aborted, again

    second, aborted, again = asyncio.run(run())
    assert second[0] == 400 and "rid" in second[1]["error"]["message"]
    assert aborted[0] == 200 and aborted[1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert again[0] == 200 and again[1]["meta_info"]["finish_reason"]["type"] != "abort"
