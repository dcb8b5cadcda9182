"""Rollouts are independent draws from the behaviour policy: per-request seeds, the first token's law, reruns.

A seed repeated on every request decodes every group with the same noise. These tests pin
what fixes it: `request_seed` separates requests, the local engine's samples follow its own
probabilities over thousands of draws from many requests, and a run seed replays a run exactly.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.rollout.engines.local import LocalEngine, sampling_distribution
from megatron_m2po.rollout.seeding import SEED_BITS, request_seed
from megatron_m2po.types import SamplingParams

torch.set_num_threads(1)
PROMPT = [40, 41, 42]
SIGNIFICANCE = 1e-3  # fixed run seeds make every p-value below deterministic
LOGIT_SCALE = 20.0  # the tiny model's logits are nearly flat; sharpen them so the law has a shape to match


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny"), seed=0)


def make_engine(hf_dir, **kwargs) -> LocalEngine:
    engine = LocalEngine(hf_dir, engine_id="seeds", **kwargs)
    engine.load_tensors([("lm_head.weight", engine.model.lm_head.weight * LOGIT_SCALE)])
    return engine


@pytest.fixture(scope="module")
def engine(hf_dir):
    eng = make_engine(hf_dir)
    yield eng
    asyncio.run(eng.close())


def generate(engine, requests, n, params) -> list[list]:
    """Samples of each (prompt_id, prompt_ids) request, in order."""

    async def run():
        return [await engine.generate(pid, ids, n, params) for pid, ids in requests]

    return asyncio.run(run())


def responses(groups) -> list[list[tuple[int, ...]]]:
    return [[tuple(s.response_ids) for s in g] for g in groups]


# ------------------------------------------------------------------------------------------ request_seed


keys = st.tuples(st.integers(0, 10**6), st.text(max_size=24), st.integers(0, 1024))


@given(st.integers(0, 2**63 - 1), st.sets(keys, min_size=2, max_size=200))
@example(0, {(0, "a:1@0", 1), (0, "a:1@0", 0)})  # samples of one group
@example(0, {(0, "a:1@0", 0), (0, "a:1@1", 0)})  # a prompt drawn again in the next epoch
@example(0, {(0, "a:1@0", 0), (1, "a:1@0", 0)})  # the same prompt after a weight update
@example(7, {(1, "a|2", 3), (1, "a", 23)})  # a '|' in the prompt id cannot fake another key
@example(7, {(12, "3", 0), (1, "23", 0)})  # nor can digits moved between fields
@settings(max_examples=200, deadline=None)
def test_request_seeds_never_collide_and_fit_62_bits(run_seed, key_set):
    seeds = [request_seed(run_seed, version, pid, index) for version, pid, index in key_set]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 1 << SEED_BITS for s in seeds)
    # a pure function of its inputs, and another run seed moves every request
    assert seeds == [request_seed(run_seed, v, p, i) for v, p, i in key_set]
    other = [request_seed(run_seed + 1, v, p, i) for v, p, i in key_set]
    assert not set(seeds) & set(other)


def test_no_run_seed_means_no_request_seed():
    assert request_seed(None, 3, "a:1@0", 2) is None


# -------------------------------------------------------------------------------- independent requests


def test_requests_of_one_prompt_draw_different_samples(engine):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)
    ids = ["p:0@0", "p:0@1", "p:0@2"]  # the same prompt in three epochs
    groups = responses(generate(engine, [(pid, PROMPT) for pid in ids], 4, params))
    assert len({r for g in groups for r in g}) > 8, groups
    for a in range(3):
        for b in range(a + 1, 3):
            assert groups[a] != groups[b]
    # the same prompt id at another policy version draws new noise as well
    later = make_engine(engine.hf_dir, version=5)
    try:
        (moved,) = responses(generate(later, [(ids[0], PROMPT)], 4, params))
    finally:
        asyncio.run(later.close())
    assert moved != groups[0]


def test_rerun_with_the_run_seed_replays_and_another_seed_does_not(hf_dir):
    requests = [(f"q:{i}@0", PROMPT[: 1 + i % 3]) for i in range(4)]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11, stop_token_ids=[])
    first, second = make_engine(hf_dir, seed=1), make_engine(hf_dir, seed=2)  # constructor seeds unused
    try:
        a = generate(first, requests, 3, params)
        b = generate(second, requests, 3, params)
        c = generate(second, requests, 3, SamplingParams(**{**params.__dict__, "seed": 12}))
        # sample i of a request does not depend on the group size
        (two,) = generate(second, requests[:1], 2, params)
    finally:
        asyncio.run(first.close())
        asyncio.run(second.close())
    assert responses(a) == responses(b)
    assert [[s.behavior_logprobs for s in g] for g in a] == [[s.behavior_logprobs for s in g] for g in b]
    assert all(responses([g])[0] != responses([h])[0] for g, h in zip(a, c))
    assert responses([two]) == [responses(a)[0][:2]]


def test_without_a_run_seed_the_engine_seeds_each_request(hf_dir):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=[])
    runs = []
    for _ in range(2):
        eng = make_engine(hf_dir, seed=5)
        try:
            runs.append(responses(generate(eng, [("p:0@0", PROMPT)] * 2, 3, params)))
        finally:
            asyncio.run(eng.close())
    assert runs[0] == runs[1]  # the engine's own generator is seeded by its constructor
    assert runs[0][0] != runs[0][1]  # and moves on between requests


# ---------------------------------------------------------------------------- the law of the first token


def first_token_logits(engine) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(torch.tensor([PROMPT])).logits[0, -1].float()


def chi_square_cells(counts: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens expected >= 5 times each get a cell; the rest share one, folded into the smallest if still < 5."""
    expected = probs.double() / probs.double().sum() * counts.sum()
    big, rest = expected >= 5, (expected < 5) & (expected > 0)
    f_obs, f_exp = counts[big], expected[big]
    pooled_obs, pooled_exp = counts[rest].sum(), expected[rest].sum()
    if pooled_exp >= 5:
        return torch.cat([f_obs, pooled_obs[None]]), torch.cat([f_exp, pooled_exp[None]])
    smallest = f_exp.argmin()
    f_obs[smallest] += pooled_obs
    f_exp[smallest] += pooled_exp
    return f_obs, f_exp


@pytest.mark.parametrize(
    "temperature,top_p,top_k", [(1.0, 1.0, -1), (0.6, 1.0, -1), (1.5, 1.0, 20), (1.0, 0.8, -1)]
)
def test_first_tokens_over_many_requests_follow_the_engine_probabilities(engine, temperature, top_p, top_k):
    """64 requests x 64 samples: a repeated seed would copy one request's 64 draws 64 times and fail."""
    params = SamplingParams(
        max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, seed=3, stop_token_ids=[]
    )
    groups = generate(engine, [(f"law:{i}@0", PROMPT) for i in range(64)], 64, params)
    tokens = torch.tensor([s.response_ids[0] for g in groups for s in g])
    logits = first_token_logits(engine)
    law = sampling_distribution(logits / temperature, top_p, top_k).double()
    if top_p == 1.0 and top_k == -1:
        assert torch.allclose(law, torch.softmax(logits.double() / temperature, -1))
    counts = torch.bincount(tokens, minlength=law.numel()).double()
    assert counts[law == 0].sum() == 0, "sampled a token outside top-k / top-p"
    f_obs, f_exp = chi_square_cells(counts, law)
    assert len(f_obs) >= 5, "the law must spread over several tokens for the test to mean anything"
    p = stats.chisquare(f_obs.numpy(), f_exp.numpy()).pvalue
    assert p > SIGNIFICANCE, (p, f_obs.tolist(), f_exp.tolist())
    # the behaviour log-prob of each first token is log_softmax(logits / T), whatever top-p / top-k did
    got = torch.tensor([s.behavior_logprobs[0] for g in groups for s in g])
    assert torch.allclose(got, torch.log_softmax(logits / temperature, -1)[tokens], atol=1e-5, rtol=0)


def test_the_law_test_rejects_a_repeated_seed(engine):
    """The same check on the old behaviour (one seed for every request) fails: the test has power."""
    params = SamplingParams(max_new_tokens=1, temperature=1.0, seed=3, stop_token_ids=[])
    (group,) = generate(engine, [("law:0@0", PROMPT)], 64, params)
    tokens = torch.tensor([s.response_ids[0] for s in group] * 64)  # 64 requests decoded with one noise tape
    law = torch.softmax(first_token_logits(engine).double(), -1)
    f_obs, f_exp = chi_square_cells(torch.bincount(tokens, minlength=law.numel()).double(), law)
    assert stats.chisquare(f_obs.numpy(), f_exp.numpy()).pvalue < SIGNIFICANCE
