"""LocalEngine: behaviour log-probs equal a full-sequence recompute, sampling controls, weight updates mid-request."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout.engines.base import EngineError
from megatron_m2po.rollout.engines.local import LocalEngine, sampling_distribution
from megatron_m2po.types import SamplingParams
from tests.conftest import subprocess_env

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def engine(hf_dir):
    eng = LocalEngine(hf_dir, engine_id="local-test")
    yield eng
    asyncio.run(eng.close())


def recompute_logprobs(model, sample, temperature: float) -> torch.Tensor:
    """What a trainer does: one forward over prompt+response, log_softmax(logits / T) of the response tokens."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    p = len(sample.prompt_ids)
    lp = torch.log_softmax(logits[p - 1 : -1] / temperature, -1)
    return lp.gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, 20)])
def test_logprobs_match_full_forward(engine, temperature, top_p, top_k):
    params = SamplingParams(max_new_tokens=24, temperature=temperature, top_p=top_p, top_k=top_k, seed=3)
    samples = asyncio.run(engine.generate("p0", [11, 12, 13, 14, 15], 3, params))
    assert [s.group_index for s in samples] == [0, 1, 2]
    for s in samples:
        assert len(s.response_ids) == len(s.behavior_logprobs) == len(s.versions) > 0
        ref = recompute_logprobs(engine.model, s, temperature)
        assert torch.allclose(torch.tensor(s.behavior_logprobs), ref, atol=1e-5, rtol=0)
        assert s.engine_id == "local-test" and set(s.versions) == {0}
    # different samples of a group differ (they are independent draws)
    assert len({tuple(s.response_ids) for s in samples}) > 1


def test_seed_reproducible_and_stop_tokens(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    a = asyncio.run(engine.generate("p", [20, 21, 22], 2, params))
    b = asyncio.run(engine.generate("p", [20, 21, 22], 2, params))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    # make the third generated token of sample 0 a stop token: generation stops right there
    stop = a[0].response_ids[2]
    c = asyncio.run(
        engine.generate(
            "p",
            [20, 21, 22],
            2,
            SamplingParams(max_new_tokens=16, temperature=1.0, seed=7, stop_token_ids=[stop]),
        )
    )
    first = a[0].response_ids.index(stop)
    assert c[0].response_ids == a[0].response_ids[: first + 1] and c[0].finish_reason == "stop"
    # rows that go on after another row stopped decode from the pruned KV cache: still exact
    for s in c:
        ref = recompute_logprobs(engine.model, s, 1.0)
        assert torch.allclose(torch.tensor(s.behavior_logprobs), ref, atol=1e-5, rtol=0)
    assert (
        c[1].finish_reason == "length" and len(c[1].response_ids) == 16
    )  # fixed seed: row 1 never samples `stop`
    assert a[0].finish_reason == "length" or stop in a[0].response_ids


@given(st.integers(1, 40), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_sampling_distribution_support(top_k, top_p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 64, generator=g) * 3
    probs = sampling_distribution(logits, top_p, top_k)
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)
    support = probs > 0
    assert (support.sum(-1) <= top_k).all() and (support.sum(-1) >= 1).all()
    # the kept tokens are the most likely ones; top-p acts on the top-k-renormalised mass (as HF and SGLang do)
    full = torch.softmax(logits, -1)
    for row in range(2):
        kept = full[row][support[row]]
        dropped = full[row][~support[row]]
        if dropped.numel():
            assert kept.min() >= dropped.max() - 1e-7
        topk_mass = full[row].topk(min(top_k, 64)).values.sum()
        assert kept.sum() / topk_mass >= top_p - 1e-5
        # and it is the smallest such set: without its least likely token the mass falls short of top_p
        assert (kept.sum() - kept.min()) / topk_mass < top_p + 1e-5


@given(
    st.integers(2, 300),
    st.integers(1, 6),
    st.floats(0.1, 2.0),
    st.floats(0.05, 1.0),
    st.integers(-1, 40),
    st.integers(0, 2**31 - 1),
)
@example(2, 1, 1.0, 1.0, -1, 0)
@example(300, 6, 0.1, 0.05, 1, 7)  # one token left: every draw must be it
@settings(max_examples=60, deadline=None)
def test_batched_draw_is_torch_multinomial(vocab, rows, temperature, top_p, top_k, seed):
    """The engine draws all rows at once; each row's token is torch.multinomial's with that row's generator,
    and the generators stay in step over successive draws."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    ours, torchs = ([torch.Generator().manual_seed(seed + r) for r in range(rows)] for _ in range(2))
    probs = sampling_distribution(logits / temperature, top_p, top_k)
    for _ in range(3):
        tokens, _ = LocalEngine._sample(logits, params, ours)
        assert tokens.tolist() == [
            torch.multinomial(p[None], 1, generator=g).item() for p, g in zip(probs, torchs)
        ]


class SteppedEngine(LocalEngine):
    """A LocalEngine that stops after its k-th sampling step until the test lets it go on, so a weight update
    lands at a known point of a request (sampling runs outside the weights lock, like every step)."""

    def __init__(self, *args, hold_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold_after, self.steps = hold_after, 0
        self.held, self.release = threading.Event(), threading.Event()

    def _sample(self, logits, params, generators):
        out = LocalEngine._sample(logits, params, generators)
        self.steps += 1
        if self.steps == self.hold_after:
            self.held.set()
            self.release.wait(30)
        return out


def test_weight_update_mid_request_records_versions(hf_dir):
    engine = SteppedEngine(hf_dir, hold_after=4)
    old_model = copy.deepcopy(engine.model)
    new_weights = {
        k: v + 0.05 * torch.randn_like(v) for k, v in engine.state_dict().items() if "norm" not in k
    }
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=1, stop_token_ids=[])

    async def run():
        task = asyncio.ensure_future(engine.generate("p", [30, 31, 32], 1, params))
        await asyncio.to_thread(engine.held.wait, 30)
        update = asyncio.ensure_future(engine.update_weights(new_weights.items(), version=1))
        await asyncio.wait_for(update, 30)  # the update does not wait for the request to finish
        engine.release.set()
        return await task

    (s,) = asyncio.run(run())
    asyncio.run(engine.close())
    assert len(s.versions) == 10, "the fixed seed must not hit EOS in 10 tokens"
    assert s.versions == [0] * 4 + [1] * 6
    assert engine.version == 1
    for name, tensor in new_weights.items():
        assert torch.equal(engine.state_dict()[name], tensor)
    # tokens 0..3 came from the old weights: a recompute with them matches; token 4 onwards does not
    ref = recompute_logprobs(old_model, s, 1.0)
    got = torch.tensor(s.behavior_logprobs)
    assert torch.allclose(got[:4], ref[:4], atol=1e-5, rtol=0)
    assert (got[4:] - ref[4:]).abs().max() > 1e-3


def test_update_errors_name_the_tensor(engine):
    with pytest.raises(KeyError, match="model.layers.0.nope"):
        asyncio.run(engine.update_weights([("model.layers.0.nope", torch.zeros(1))], version=1))
    with pytest.raises(ValueError, match=r"lm_head.weight.*shape \(3, 3\)"):
        asyncio.run(engine.update_weights([("lm_head.weight", torch.zeros(3, 3))], version=1))


def test_cancelled_request_stops_and_engine_keeps_serving(engine):
    async def run():
        await engine.pause()  # holds the request at its first step, so the cancel surely lands mid-request
        task = asyncio.ensure_future(engine.generate("long", [1, 2, 3], 1, SamplingParams(max_new_tokens=64)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.resume()
        return await asyncio.wait_for(
            engine.generate("next", [1, 2, 3], 1, SamplingParams(max_new_tokens=4)), 10
        )

    (s,) = asyncio.run(run())
    assert len(s.response_ids) == 4


# ---------------------------------------------------------------------------------- batched decoding


def forward_batch_sizes(engine) -> list[int]:
    """The batch size of every decoding forward the engine runs from now on (not the tests' recomputes)."""
    sizes: list[int] = []

    def record(module, args, kwargs, out):
        if "input_ids" in kwargs:
            sizes.append(kwargs["input_ids"].shape[0])

    engine.model.register_forward_hook(record, with_kwargs=True)
    return sizes


def run_concurrently(engine, requests) -> list:
    """All (prompt_id, prompt_ids, n, params) requests submitted at once; each one's samples, in order."""

    async def run():
        return await asyncio.gather(*(engine.generate(*request) for request in requests))

    return asyncio.run(run())


def assert_same_samples(got, want, model, temperatures):
    """Per sample: the same tokens, finish and versions, log-probs to 1e-5, and log-probs equal to a plain HF
    forward of prompt+response. Batched matmuls round differently from batch-of-one ones (~5e-7 here), so a
    draw could in principle flip where a sampled uniform lands within ~1e-7 of a token's boundary (or a greedy
    argmax ties); that is ~1e-6 per draw and has not happened in any example run, so tokens are compared
    exactly."""
    for g, w, temperature in zip(got, want, temperatures, strict=True):
        for s, t in zip(g, w, strict=True):
            assert (s.prompt_id, s.group_index) == (t.prompt_id, t.group_index)
            assert s.response_ids == t.response_ids and s.finish_reason == t.finish_reason
            assert s.versions == t.versions
            assert torch.allclose(
                torch.tensor(s.behavior_logprobs), torch.tensor(t.behavior_logprobs), atol=1e-5
            )
            ref = recompute_logprobs(model, s, temperature or 1.0)  # greedy: log-probs at T=1
            assert torch.allclose(torch.tensor(s.behavior_logprobs), ref, atol=1e-5, rtol=0)


STOPS = [40, 41, 42, 43, 44, 45]  # ~2% of the tiny model's flat draws: some rows leave early


@st.composite
def request_sets(draw):
    """Requests of different prompt lengths, group sizes, stop tokens and sampling settings (greedy too)."""
    requests = []
    for i in range(draw(st.integers(2, 7))):
        prompt = draw(st.lists(st.integers(3, 200), min_size=1, max_size=14))
        n = draw(st.integers(1, 5))
        temperature, top_p, top_k = draw(st.sampled_from([(1.0, 1.0, -1), (0.7, 0.9, 20), (0.0, 1.0, -1)]))
        stop = draw(st.lists(st.sampled_from(STOPS), max_size=3))
        max_new = draw(st.integers(1, 8))
        seed = draw(st.integers(0, 9))
        params = SamplingParams(max_new, temperature, top_p, top_k, stop_token_ids=stop, seed=seed)
        requests.append((f"q{i}", prompt, n, params))
    return requests


@pytest.fixture(scope="module")
def engine_pair(hf_dir):
    """A batching engine and one that decodes one request at a time, on the same weights."""
    batched = LocalEngine(hf_dir, engine_id="local-test")
    alone = LocalEngine(hf_dir, engine_id="local-test", max_batch_rows=0)
    yield batched, alone
    asyncio.run(batched.close())
    asyncio.run(alone.close())


MIXED_REQUESTS = [
    ("a", [5], 3, SamplingParams(8, 1.0, stop_token_ids=STOPS, seed=1)),
    ("b", list(range(3, 17)), 2, SamplingParams(8, 0.7, 0.9, 20, seed=1)),
    ("c", [9, 8, 7], 4, SamplingParams(8, 0.0, seed=1)),
]


@given(request_sets())
@example(MIXED_REQUESTS)
@settings(max_examples=12, deadline=None)
def test_batched_requests_decode_as_they_would_alone(engine_pair, requests):
    batched, alone = engine_pair
    got = run_concurrently(batched, requests)
    want = run_concurrently(alone, requests)
    assert_same_samples(got, want, batched.model, [params.temperature for *_, params in requests])


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_batching_in_the_other_families_and_eager_attention(tmp_path, arch, attn):
    """Llama (tied embeddings, llama3 rope scaling), Qwen2 (qkv bias) and the eager kernel, which adds the
    padding mask to its scores rather than passing it to SDPA."""
    hf_dir = make_tiny_model(arch, tmp_path / arch, seed=0)
    batched = LocalEngine(hf_dir, engine_id="local-test", attn_implementation=attn)
    alone = LocalEngine(hf_dir, engine_id="local-test", attn_implementation=attn, max_batch_rows=0)
    got, want = run_concurrently(batched, MIXED_REQUESTS), run_concurrently(alone, MIXED_REQUESTS)
    assert_same_samples(got, want, batched.model, [params.temperature for *_, params in MIXED_REQUESTS])
    for engine in (batched, alone):
        asyncio.run(engine.close())


class HeldEngine(LocalEngine):
    """A LocalEngine that stops after each sampling step in `hold_at` until the test releases it, so requests
    join, leave or meet a weight update at a known step of the batch."""

    def __init__(self, *args, hold_at: set[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0
        self.held = {k: threading.Event() for k in hold_at}
        self.release = {k: threading.Event() for k in hold_at}

    def _sample(self, logits, params, generators):
        out = LocalEngine._sample(logits, params, generators)
        self.steps += 1
        if self.steps in self.held:
            self.held[self.steps].set()
            self.release[self.steps].wait(30)
        return out

    async def at_step(self, k: int) -> None:
        await asyncio.to_thread(self.held[k].wait, 30)
        assert self.held[k].is_set(), f"the engine never reached step {k}"


PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0, seed=2)


def test_requests_join_a_running_batch_and_a_cancelled_one_leaves(hf_dir, engine_pair):
    _, alone = engine_pair
    engine = HeldEngine(hf_dir, engine_id="local-test", hold_at={2, 5})
    sizes = forward_batch_sizes(engine)
    requests = {
        "a": ("a", [3, 4, 5], 2, PARAMS),
        "b": ("b", list(range(10, 17)), 3, PARAMS),
        "c": ("c", [60], 2, PARAMS),
        "d": ("d", [7, 8, 9, 10, 11], 1, PARAMS),
    }

    async def run():
        tasks = {"a": asyncio.ensure_future(engine.generate(*requests["a"]))}
        await engine.at_step(2)
        tasks.update({k: asyncio.ensure_future(engine.generate(*requests[k])) for k in "bcd"})
        await asyncio.sleep(0.2)  # b, c, d are pending: they join at step 3
        engine.release[2].set()
        await engine.at_step(5)
        tasks["c"].cancel()
        with pytest.raises(asyncio.CancelledError):  # c's cancel flag is set before the worker moves on:
            await tasks["c"]  # released first, a loaded machine could decode steps 6-7 before the loop ran c
        engine.release[5].set()
        done = {k: await tasks[k] for k in "abd"}
        (after,) = await asyncio.wait_for(engine.generate("e", [1, 2], 1, PARAMS), 10)
        return done, after

    done, after = asyncio.run(run())
    asyncio.run(engine.close())
    # a (prefilled once for its 2 rows) decoded alone for two steps; b, c, d were prefilled together at step 3
    # (one row per prompt), then all 8 rows decoded as one
    assert sizes[:4] == [1, 2, 2, 3] and sizes[4] == 8, sizes
    # after the cancel at step 5 c's two rows are gone and never come back
    assert max(sizes[7:]) <= 6, sizes
    want = run_concurrently(alone, [requests[k] for k in "abd"])
    assert_same_samples([done[k] for k in "abd"], want, engine.model, [1.0] * 3)
    assert len(after.response_ids) > 0 and after.timings["queue_s"] >= 0


def test_weight_update_mid_batch(hf_dir):
    engine = HeldEngine(hf_dir, engine_id="local-test", hold_at={3})
    old_model = copy.deepcopy(engine.model)
    new_weights = {
        k: v + 0.05 * torch.randn_like(v) for k, v in engine.state_dict().items() if "norm" not in k
    }
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=1, stop_token_ids=[])
    late_request = ("late", [9, 9, 9, 9], 2, params)

    async def run():
        await engine.pause()  # a and b surely start together
        early = asyncio.ensure_future(
            asyncio.gather(
                engine.generate("a", [30, 31, 32], 2, params), engine.generate("b", [5], 1, params)
            )
        )
        await asyncio.sleep(0.2)
        await engine.resume()
        await engine.at_step(3)
        await asyncio.wait_for(engine.update_weights(new_weights.items(), version=1), 30)
        late = asyncio.ensure_future(engine.generate(*late_request))  # joins at step 4, on the new weights
        await asyncio.sleep(0.2)
        engine.release[3].set()
        return await early, await late

    (a, b), late = asyncio.run(run())
    asyncio.run(engine.close())
    assert engine.version == 1
    new_model = copy.deepcopy(old_model)
    new_model.load_state_dict(new_weights, strict=False)
    for s in a + b:
        assert len(s.versions) == 10, "the fixed seed must not hit EOS in 10 tokens"
        assert s.versions == [0] * 3 + [1] * 7
        # tokens 0..2 came from the old weights; from token 3 on the new weights answer (on the old cache)
        got, ref = torch.tensor(s.behavior_logprobs), recompute_logprobs(old_model, s, 1.0)
        assert torch.allclose(got[:3], ref[:3], atol=1e-5, rtol=0)
        assert (got[3:] - ref[3:]).abs().max() > 1e-3
    # the late request ran wholly on version 1, seeded with version 1: as a v1 engine decodes it alone
    reference = LocalEngine(hf_dir, engine_id="local-test", version=1, max_batch_rows=0)
    reference.load_tensors(new_weights.items())
    want = run_concurrently(reference, [late_request])
    asyncio.run(reference.close())
    assert all(s.versions == [1] * 10 for s in late)
    assert_same_samples([late], want, new_model, [1.0])


def test_row_cap_and_close(hf_dir, engine_pair):
    _, alone = engine_pair
    engine = LocalEngine(hf_dir, engine_id="local-test", max_batch_rows=4)
    sizes = forward_batch_sizes(engine)
    requests = [(f"r{i}", list(range(3, 3 + i)), n, PARAMS) for i, n in enumerate([3, 1, 2, 5], start=1)]
    got = run_concurrently(engine, requests)
    # no batch goes over 4 rows; the 5-sample request, larger than the cap, ran alone
    assert max(sizes) == 5 and all(size <= 4 for size in sizes if size != 5), sizes
    assert_same_samples(got, run_concurrently(alone, requests), engine.model, [1.0] * 4)

    held = HeldEngine(hf_dir, hold_at={1})

    async def close_while_decoding():
        running = asyncio.ensure_future(held.generate("a", [1, 2], 1, PARAMS))
        await held.at_step(1)
        waiting = asyncio.ensure_future(held.generate("b", [1, 2], 8, PARAMS))
        await asyncio.sleep(0.1)
        await held.close()
        held.release[1].set()
        return await asyncio.gather(running, waiting, return_exceptions=True)

    outcomes = asyncio.run(close_while_decoding())
    assert all(isinstance(e, EngineError) and "closed" in str(e) for e in outcomes), outcomes


def test_a_paused_engine_never_closed_does_not_hold_the_interpreters_exit(hf_dir):
    """A request waiting on a paused engine that its owner forgot to close: the process still exits (the
    worker thread is joined at exit by concurrent.futures; it must notice the exit and give up)."""
    script = f"""
import asyncio
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.types import SamplingParams

engine = LocalEngine({str(hf_dir)!r}, engine_id="forgotten", seed=0)

async def main():
    await engine.pause()
    task = asyncio.ensure_future(engine.generate("p", [1, 2, 3], 2, SamplingParams(max_new_tokens=4)))
    await asyncio.sleep(0.5)  # the worker is now waiting for resume()
    assert not task.done()
    print("waiting", flush=True)

asyncio.run(main())
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert proc.returncode == 0 and "waiting" in proc.stdout, proc.stderr[-3000:]
