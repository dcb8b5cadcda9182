"""The tool environment (`rollout.env=tool_math`): model turns generated from the trajectory's ids, tool replies
from the real sandbox rendered by the chat template, budgets, rewards from the final answer, and many
trajectories in flight at once."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from megatron_m2po.commands.tool_demo import call_text, trace_pairs
from megatron_m2po.config import Config, ConfigError, SandboxConfig, routing_replay_on, validate
from megatron_m2po.data.prompts import Prompt, PromptDataset
from megatron_m2po.event_loop import LoopThread
from megatron_m2po.models.tiny import make_tiny_model, tiny_config
from megatron_m2po.rollout import build
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.environments import ToolMath
from megatron_m2po.rollout.environments.tool_math import ToolMathSettings
from megatron_m2po.rollout.environments.trajectory import EnvTurnRenderer
from megatron_m2po.rollout.evaluation import environment_eval_metrics, rollout_all, stop_token_ids
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.rollout.manager import RolloutManager
from megatron_m2po.rollout.producer import EVAL_RECORD, Producer, read_eval_record
from megatron_m2po.rollout.rewards import RewardPool
from megatron_m2po.rollout.tools import SandboxPool
from megatron_m2po.types import Sample, SamplingParams

torch.set_num_threads(1)
CALL = '<tool_call>{"name": "python", "arguments": {"code": "print(123*456)"}}</tool_call>'
SCRIPTS = {  # trajectory index -> its model turns, in order (the last one repeats)
    0: ["Let me compute." + CALL, "\\boxed{56088}"],
    1: ['<tool_call>{"name": "python", "arguments": {"cod', "\\boxed{56088}"],  # cut off, then answers
    2: ["\\boxed{56000}"],  # answers at once, wrongly
    3: [CALL + CALL],  # calls forever: two calls per turn
    4: ["\\boxed{1}", "\\boxed{56088}"],  # wrong, then (told so) right
    5: [call_text("123*456"), "\\boxed{56088}"],  # the tool demo's warm-start trace
}


class ScriptedEngine(LocalEngine):
    """A LocalEngine whose turns are the script's text for (trajectory, turn), read from the request id the
    environment sends; the log-probs are the real model's for those tokens given the ids it was sent, so a
    test can check what the environment generated from and where each turn's numbers land."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list[tuple[str, list[int]]] = []
        self.inflight = self.max_inflight = 0

    async def generate(self, prompt_id, prompt_ids, n, params):
        self.requests.append((prompt_id, list(prompt_ids)))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(0.05)  # every trajectory's turn is requested before any is answered
            _, index, turn = prompt_id.rsplit("/", 2)
            script = SCRIPTS[int(index)]
            text = script[min(int(turn), len(script) - 1)]
            end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            ids = (self.tokenizer.encode(text, add_special_tokens=False) + [end])[: params.max_new_tokens]
            with torch.no_grad():
                logits = self.model(torch.tensor([list(prompt_ids) + ids])).logits[
                    0, len(prompt_ids) - 1 : -1
                ]
            logprobs = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
            finish = "stop" if ids[-1] == end else "length"
            return [
                Sample(
                    prompt_id, 0, list(prompt_ids), ids, logprobs.tolist(), [self.version] * len(ids), finish
                )
            ]
        finally:
            self.inflight -= 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("toolmath")
    hf_dir = make_tiny_model("qwen3", root / "model", seed=2)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    rewards = RewardPool(workers=1, timeout=20)
    pool = SandboxPool(SandboxConfig(workers=4, wall_seconds=20))
    loop = LoopThread("tool-math-test")
    yield hf_dir, tok, rewards, pool, loop
    loop.stop()
    pool.close()
    rewards.close()


def _prompt(tok, text: str = "What is 123*456?", prompt_id: str = "task:1") -> Prompt:
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return Prompt(prompt_id, tok.encode(rendered, add_special_tokens=False), "56088", text)


def _rollout(setup, settings: ToolMathSettings, n: int = 4, engine=None, prompt=None):
    hf_dir, tok, rewards, pool, loop = setup
    engine = engine or ScriptedEngine(hf_dir, engine_id="scripted")
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=3, stop_token_ids=stop_token_ids(tok))
    env = ToolMath(EngineFarm([engine]), rewards, tok, params, settings, sandbox=pool)
    return env, engine, loop.run(env.rollout(prompt or _prompt(tok), n))


def test_trajectories_are_token_exact_with_the_sandbox_s_replies_and_answers_scored(setup):
    _, tok, *_ = setup
    env, engine, samples = _rollout(setup, ToolMathSettings(max_turns=3))
    prompt = _prompt(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    # trajectory 0: a call, the sandbox's output, the answer; the ids are the chat template's rendering
    s = samples[0]
    reply = "56088\n"
    messages = [
        {"role": "user", "content": prompt.text},
        {"role": "assistant", "content": SCRIPTS[0][0]},
        {"role": "tool", "content": reply},
        {"role": "assistant", "content": SCRIPTS[0][1]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert s.prompt_ids + s.response_ids + tok.encode("\n") == tok.encode(rendered, add_special_tokens=False)
    first = tok.encode(SCRIPTS[0][0]) + [im_end]
    second = tok.encode(SCRIPTS[0][1]) + [im_end]
    env_len = len(s.response_ids) - len(first) - len(second)
    assert s.loss_mask == [1] * len(first) + [0] * env_len + [1] * len(second)
    assert s.turn_starts == [0, len(first), len(first) + env_len]
    assert (s.reward, s.finish_reason, s.model_tokens) == (1.0, "stop", len(first) + len(second))
    # each turn was generated from the ids so far, and its log-probs sit on its own tokens
    sent = {pid: ids for pid, ids in engine.requests}
    assert sent["task:1/0/0"] == s.prompt_ids == prompt.prompt_ids  # the template has no place for tools
    assert sent["task:1/0/1"] == s.prompt_ids + s.response_ids[: len(first) + env_len]
    assert all(lp == 0.0 for lp, m in zip(s.behavior_logprobs, s.loss_mask) if not m)
    assert all(lp < 0.0 for lp, m in zip(s.behavior_logprobs, s.loss_mask) if m)

    # trajectory 1: the cut-off call is answered with an error, the model answers after it
    text1 = samples[1].response_text
    assert "not closed with </tool_call>" in text1 and samples[1].reward == 1.0
    # trajectory 2: one turn, a wrong answer, no environment tokens
    assert samples[2].loss_mask == [1] * len(samples[2].response_ids) and samples[2].reward == 0.0
    # trajectory 3: calls every turn until max_turns; its last turn's calls are not answered
    assert (len(samples[3].turn_starts), samples[3].finish_reason, samples[3].reward) == (5, "length", 0.0)
    # the four trajectories' turns were in flight together, and the tool ran where the script called it
    assert engine.max_inflight == 4
    m = env.metrics()
    assert m["env/used_tool_fraction"] == 0.5 and m["env/tool_calls"] >= 1 + 4
    assert m["env/call_errors"] == 1


def test_budgets_end_trajectories_and_refuse_calls_beyond_the_limit(setup):
    _, _, samples = _rollout(setup, ToolMathSettings(max_turns=3, max_tool_calls=1), n=4)
    calls = samples[3].response_text
    assert calls.count("56088") == 1 and "the limit of 1 tool calls is reached" in calls
    _, _, short = _rollout(setup, ToolMathSettings(max_turns=3, max_total_tokens=60), n=4)
    for s in short:
        assert len(s.response_ids) <= 60
    assert short[0].finish_reason == "length" and len(short[0].turn_starts) == 1  # no room for the reply


def test_tool_use_reward_is_off_by_default_and_adds_when_set(setup):
    _, _, plain = _rollout(setup, ToolMathSettings(max_turns=3), n=3)
    _, _, bonus = _rollout(setup, ToolMathSettings(max_turns=3, tool_use_reward=0.25), n=3)
    assert [s.reward for s in plain] == [1.0, 1.0, 0.0]
    assert [s.reward for s in bonus] == [1.25, 1.0, 0.0]  # trajectory 1's call never ran


def test_a_wrong_answer_gets_feedback_while_attempts_remain(setup):
    _, tok, *_ = setup
    _, _, once = _rollout(setup, ToolMathSettings(max_turns=4), n=5)
    assert [len(s.turn_starts) for s in once[2:5:2]] == [1, 1] and once[4].reward == 0.0
    _, engine, retried = _rollout(setup, ToolMathSettings(max_turns=4, max_attempts=3), n=5)
    wrong, fixed = retried[2], retried[4]
    assert (len(wrong.turn_starts), wrong.reward, wrong.finish_reason) == (5, 0.0, "stop")  # 3 answers
    assert (len(fixed.turn_starts), fixed.reward) == (3, 1.0)
    feedback = fixed.response_ids[fixed.turn_starts[1] : fixed.turn_starts[2]]
    assert "That answer is not correct. Try again." in tok.decode(feedback)
    assert fixed.loss_mask.count(0) == len(feedback)
    sent = dict(engine.requests)
    assert sent["task:1/4/1"] == fixed.prompt_ids + fixed.response_ids[: fixed.turn_starts[2]]


def test_the_tool_demo_s_warm_start_traces_are_what_the_environment_produces(setup):
    """The demo imitates trajectories token for token: the pairs of a tool trace (context, model turn) are the
    prefixes and model turns of the trajectory the environment builds from the same turns and the sandbox."""
    _, tok, *_ = setup
    prompt = _prompt(tok, "123*456=", "task:2")
    _, _, samples = _rollout(setup, ToolMathSettings(max_turns=2), n=6, prompt=prompt)
    s = samples[5]
    renderer = EnvTurnRenderer(tok, stop_token_ids(tok))
    (c1, t1), (c2, t2) = trace_pairs(tok, renderer, prompt, use_tool=True)
    assert c1 == s.prompt_ids and c2 + t2 == s.prompt_ids + s.response_ids
    assert t1 == s.response_ids[: s.turn_starts[1]] and t2 == s.response_ids[s.turn_starts[2] :]
    assert s.reward == 1.0
    assert trace_pairs(tok, renderer, prompt, use_tool=False) == [(c1, t2)]


def test_settings_are_validated_and_named():
    assert ToolMath.parse_settings({"max_turns": 2}).max_turns == 2
    with pytest.raises(
        ConfigError, match=r"'rollout.env_settings.max_turn': not a setting of rollout.env=tool_math"
    ):
        ToolMath.parse_settings({"max_turn": 2})
    with pytest.raises(ConfigError, match="max_total_tokens must be an integer >= 1"):
        ToolMath.parse_settings({"max_total_tokens": 0})
    with pytest.raises(ConfigError, match="tool_timeout must be > 0"):
        ToolMath.parse_settings({"tool_timeout": -1})


def test_through_the_manager_with_the_real_engine_every_turn_is_the_engine_s_own(setup, tmp_path):
    """rollout.env=tool_math built from the config, a random tiny model on the real local engine: each
    sample's first turn is exactly what the engine returns for the same request."""
    hf_dir, tok, rewards, pool, _ = setup
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"{i}*{i}=", "answer": str(i * i)}) + "\n" for i in range(4))
    )
    cfg = Config()
    cfg.rollout.env, cfg.rollout.env_settings = "tool_math", {"max_turns": 2, "max_total_tokens": 24}
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, stop_token_ids=stop_token_ids(tok))
    farm = EngineFarm([LocalEngine(hf_dir, engine_id="e0", seed=0)])
    env = build.environment(cfg, farm, rewards, tok, params)
    assert isinstance(env, ToolMath) and env.settings.max_turns == 2
    manager = RolloutManager(
        PromptDataset(data, tok, seed=0),
        farm,
        rewards,
        None,
        responses_per_prompt=2,
        sampling=params,
        environment=env,
    )
    try:
        groups = manager.generate_batch(2, version=0)
        metrics = manager.metrics()
    finally:
        manager.stop()
    assert "env/turns_mean" in metrics and "env/tool_calls" in metrics
    reference = EngineFarm([LocalEngine(hf_dir, engine_id="e0", seed=0)])
    loop = LoopThread("reference")
    try:
        for g in groups:
            for i, s in enumerate(g.samples):
                end = s.turn_starts[1] if len(s.turn_starts) > 1 else len(s.response_ids)
                (direct,) = loop.run(reference.generate(f"{g.prompt_id}/{i}/0", s.prompt_ids, 1, params))
                assert s.response_ids[:end] == direct.response_ids
                # (batched with the other trajectories' rows there, alone here: equal to float rounding)
                assert s.behavior_logprobs[:end] == pytest.approx(direct.behavior_logprobs, abs=1e-5)
                assert len(s.response_ids) <= 24 and s.loss_mask[:end] == [1] * end
    finally:
        loop.run(reference.close())
        loop.stop()


def test_held_out_evaluation_runs_through_the_environment_with_the_tool(setup):
    """Evaluation's environment answers with the sandbox's tool, one answer per trajectory and no tool bonus,
    with counters of its own: accuracy and the share of answers given after a tool call ran."""
    hf_dir, tok, rewards, pool, loop = setup
    engine = ScriptedEngine(hf_dir, engine_id="scripted")
    train_sampling = SamplingParams(
        max_new_tokens=200, temperature=1.0, seed=3, stop_token_ids=stop_token_ids(tok)
    )
    settings = ToolMathSettings(max_turns=4, tool_use_reward=0.25, max_attempts=3)
    env = ToolMath(EngineFarm([engine]), rewards, tok, train_sampling, settings, sandbox=pool)
    greedy = replace(train_sampling, temperature=0.0)
    evaluation = env.for_evaluation(greedy)
    assert evaluation.pool is env.pool and evaluation.sampling == greedy
    assert (evaluation.settings.tool_use_reward, evaluation.settings.max_attempts) == (0.0, 1)
    prompts = [_prompt(tok), _prompt(tok, prompt_id="task:3")]
    groups = loop.run(rollout_all(evaluation, prompts, 5, concurrency=2))
    # per prompt: 0 calls then answers right, 1's call is cut off then right, 2 wrong, 3 calls until max_turns,
    # 4 wrong once (no second attempt): the rewards are the reward function's alone
    assert [[s.reward for s in g] for g in groups] == [[1.0, 1.0, 0.0, 0.0, 0.0]] * 2
    assert [len(s.turn_starts) for s in groups[0]] == [3, 3, 1, 7, 1]
    m = environment_eval_metrics(evaluation)
    assert m["used_tool_fraction"] == 2 / 5 and m["turns_mean"] == (2 + 2 + 1 + 4 + 1) / 5
    assert set(m) == {"turns_mean", "tool_calls_mean", "used_tool_fraction", "length_end_fraction"}
    assert env.metrics()["env/turns_mean"] == 0.0  # the training environment's counters are untouched
    loop.run(evaluation.close())
    assert pool.run("print(2+2)").stdout == "4\n"  # the shared pool still runs


def test_m2po_evaluate_with_the_tool_environment_on_the_real_engine(setup, tmp_path):
    """`m2po evaluate --env tool_math`: the local engine's greedy turns through the environment and the sandbox;
    the file's metrics hold the tool's figures beside accuracy."""
    hf_dir, *_ = setup
    from megatron_m2po.commands.m2po import main

    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(3))
    )
    out = tmp_path / "eval.json"
    settings = {"max_turns": 2, "max_total_tokens": 20}
    argv = [
        "evaluate", str(hf_dir), "--data", str(data), "--max-new-tokens", "8", "--template", "plain",
        "--reward-workers", "1", "--output", str(out), "--keep-responses", "--env", "tool_math",
        "--env-settings", json.dumps(settings),
    ]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert (payload["env"], payload["env_settings"]) == ("tool_math", settings)
    (result,) = payload["results"]
    m = result["metrics"]
    assert m["num_prompts"] == 3 and 0.0 <= m["used_tool_fraction"] <= 1.0
    assert (
        1.0 <= m["turns_mean"] <= 2.0 and m["avg@1"] == sum(r["correct"][0] for r in result["responses"]) / 3
    )
    with pytest.raises(
        ConfigError, match="'rollout.env_settings.max_turn': not a setting of rollout.env=tool_math"
    ):
        main([*argv[:-1], '{"max_turn": 2}'])


def _tool_math_config(**env_settings) -> Config:
    cfg = Config()
    cfg.model.path, cfg.data.path = "model", "prompts.jsonl"
    cfg.train.groups_per_step = cfg.train.groups_per_update = 8
    cfg.rollout.env, cfg.rollout.env_settings = "tool_math", env_settings
    return cfg


def test_routing_replay_is_refused_with_a_multi_turn_environment_by_name():
    """Routed experts are not carried across turns: replay (set, or unset on an MoE model) is a config error
    naming both keys; off, a dense model and single-turn math stay allowed."""
    cfg = _tool_math_config()
    cfg.algorithm.routing_replay = "replay"
    with pytest.raises(
        ConfigError, match=r"'algorithm.routing_replay': replay cannot run with rollout.env=tool_math"
    ):
        validate(cfg)
    moe, dense = tiny_config("qwen3_moe"), tiny_config("qwen3")
    cfg.algorithm.routing_replay = None
    validate(cfg)
    with pytest.raises(
        ConfigError, match=r"unset \(= replay for this MoE model\) cannot run with rollout.env=tool_math"
    ):
        routing_replay_on(cfg, moe)
    assert routing_replay_on(cfg, dense) is False
    cfg.algorithm.routing_replay = "off"
    assert routing_replay_on(cfg, moe) is False
    single = _tool_math_config()
    single.rollout.env, single.rollout.env_settings, single.algorithm.routing_replay = "math", {}, "replay"
    validate(single)
    assert routing_replay_on(single, moe) is True


def test_the_microbatch_token_budget_holds_a_whole_trajectory():
    """A tool_math response reaches env_settings.max_total_tokens (its default when unset), not
    rollout.max_new_tokens: the token budget is checked against it, naming the keys."""
    cfg = _tool_math_config(max_total_tokens=3000)
    cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens = 512, 1024
    cfg.train.max_tokens_per_microbatch = 3511
    with pytest.raises(
        ConfigError,
        match=r"'train.max_tokens_per_microbatch': 3511 cannot hold the longest sequence, "
        r"data.max_prompt_tokens \+ rollout.env_settings.max_total_tokens = 3512",
    ):
        validate(cfg)
    cfg.train.max_tokens_per_microbatch = 3512
    validate(cfg)
    default = _tool_math_config()  # the environment's own default bounds the response
    default.data.max_prompt_tokens, default.train.max_tokens_per_microbatch = 512, 512 + 2047
    assert ToolMathSettings().max_total_tokens == 2048
    with pytest.raises(ConfigError, match=r"rollout.env_settings.max_total_tokens = 2560"):
        validate(default)
    with pytest.raises(ConfigError, match=r"'rollout.env_settings.max_total_tokens': must be an integer"):
        validate(_tool_math_config(max_total_tokens="many"))
    single = _tool_math_config()
    single.rollout.env, single.rollout.env_settings = "math", {}
    single.data.max_prompt_tokens, single.rollout.max_new_tokens = 512, 1024
    single.train.max_tokens_per_microbatch = 1536
    validate(single)


def test_the_run_s_periodic_evaluation_answers_with_the_tool(setup, tmp_path):
    """`eval.every` in a tool_math run: the producer's evaluation goes through the run's environment (its
    settings, its sandbox pool) and logs the share of answers given after a tool call beside accuracy."""
    hf_dir, tok, *_ = setup
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"123*456 ({i})", "answer": "56088"}) + "\n" for i in range(3))
    )
    cfg = Config()
    cfg.model.path, cfg.data.path, cfg.eval.path = str(hf_dir), str(data), str(data)
    cfg.rollout.env, cfg.rollout.env_settings = "tool_math", {"max_turns": 3, "tool_use_reward": 0.5}
    cfg.sandbox.workers = 2
    producer = Producer(
        cfg, SimpleNamespace(dtype=torch.float32, routed_experts_shape=None), tmp_path, saved=None
    )
    try:
        env = producer.manager.environment
        # the script's trajectory 0 for every prompt: a call, then the answer
        env.farm = EngineFarm([ScriptedEngine(hf_dir, engine_id="scripted")])
        out = producer.evaluate(version=3)
        assert (out["eval/accuracy"], out["eval/reward_mean"]) == (1.0, 1.0)  # no tool bonus in evaluation
        tool = (out["eval/used_tool_fraction"], out["eval/turns_mean"], out["eval/tool_calls_mean"])
        assert tool == (1.0, 2.0, 1.0)
        assert env.pool.metrics()["tool/calls"] == 3  # the run's own pool ran the calls
        assert env.metrics()["env/turns_mean"] == 0.0  # the training counters are untouched
        assert read_eval_record(tmp_path / EVAL_RECORD) == {3: "111"}
    finally:
        producer.close()


TOOLS_TEMPLATE = (  # a chat template with a place for tools, as Qwen3's: a system block listing them
    "{%- if tools %}<|im_start|>system\n# Tools\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "<|im_end|>\n{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_the_token_budget_counts_the_tool_schema_the_prompt_grows_by(setup):
    """`data.max_prompt_tokens` counts the prompt without the tool's schema: building the environment checks
    the budget with the schema's tokens as the template renders them, the same growth every prompt gets."""
    hf_dir, _, rewards, _, loop = setup
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.chat_template = TOOLS_TEMPLATE
    what, extra = ToolMath.prompt_extra_tokens(tok, ToolMathSettings())
    assert what.endswith("(rollout.env_settings.tools_in_prompt)") and extra > 20
    assert ToolMath.prompt_extra_tokens(tok, ToolMathSettings(tools_in_prompt=False)) == ("", 0)
    plain = AutoTokenizer.from_pretrained(hf_dir)  # the tiny model's template has no place for tools
    assert ToolMath.prompt_extra_tokens(plain, ToolMathSettings())[1] == 0
    cfg = _tool_math_config(max_total_tokens=100)
    cfg.data.max_prompt_tokens = 50
    cfg.train.max_tokens_per_microbatch = 150 + extra - 1
    validate(cfg)  # without the tokenizer the schema cannot be counted
    params = SamplingParams(max_new_tokens=20, stop_token_ids=stop_token_ids(tok))
    farm = EngineFarm([LocalEngine(hf_dir, engine_id="e0")])
    with pytest.raises(
        ConfigError,
        match=rf"'train.max_tokens_per_microbatch': {149 + extra} cannot hold the longest sequence, "
        rf"data.max_prompt_tokens \+ the tool schema \(rollout.env_settings.tools_in_prompt\) \({extra} tokens\) "
        rf"\+ rollout.env_settings.max_total_tokens = {150 + extra}",
    ):
        build.environment(cfg, farm, rewards, tok, params)
    cfg.train.max_tokens_per_microbatch = 150 + extra
    env = build.environment(cfg, farm, rewards, tok, params)
    try:
        prompt = _prompt(tok)
        assert len(env._prompt_ids(prompt)) - len(prompt.prompt_ids) == extra
    finally:
        loop.run(env.close())
