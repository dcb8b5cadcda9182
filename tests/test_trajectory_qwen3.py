"""Multi-turn trajectories under Qwen3's real chat template (tests/fixtures/qwen3): the ids a trajectory
accumulates (the model's turns as sampled, the environment's rendered by EnvTurnRenderer) are the template's
rendering of the whole conversation, tool calls out and <tool_response> in, with the tools in the system
prompt and the model's thinking kept."""

from __future__ import annotations

import json

import pytest
from qwen3_chat import TOOLS, im_end_id, qwen3_tokenizer

from megatron_m2po.rollout.environments.tool_calls import ToolCall, parse_tool_calls
from megatron_m2po.rollout.environments.trajectory import EnvTurnRenderer, Trajectory

QUESTION = "What is 123 * 456 + 789 * 12?"


def _call(code: str) -> dict:
    return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}


def _call_text(call: dict) -> str:
    """A call as Qwen3 writes one (and as its template renders an assistant message's tool_calls)."""
    fn = call["function"]
    return (
        f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {json.dumps(fn["arguments"])}}}\n</tool_call>'
    )


# (thinking, visible text, tool calls) of each model turn; the environment answers every call with its output.
TURNS = [
    ("I should compute this with code.", "Let me compute it.", [_call("print(123 * 456)")]),
    ("123 * 456 = 56088. Two more products.", "", [_call("print(789 * 12)"), _call("print(56088 + 9468)")]),
    ("The tool says 65556.", "The answer is \\boxed{65556}.", []),
]
OUTPUTS = [["56088"], ["9468", "65556"]]


def _model_text(thinking: str, visible: str, calls: list[dict]) -> str:
    text = f"<think>\n{thinking}\n</think>\n\n{visible}"
    for i, call in enumerate(calls):
        text += ("\n" if visible or i else "") + _call_text(call)
    return text


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@pytest.mark.parametrize("tool_calls_as", ["structured", "content"])
def test_trajectory_ids_are_qwen3_templates_rendering_of_the_conversation(tok, tool_calls_as):
    """Three model turns (one call; two calls answered in one environment turn; the answer) with a weight
    update between turns: ids, loss mask, log-probs and versions align at every boundary, and the ids are the
    template's rendering, whether the conversation's assistant messages carry `tool_calls` (as an OpenAI-style
    client stores them) or the calls as text."""
    im_end = im_end_id(tok)
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    messages = [{"role": "user", "content": QUESTION}]
    traj = Trajectory(
        encode(tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False))
    )
    renderer = EnvTurnRenderer(tok, [im_end])
    spans = []
    for turn, (thinking, visible, calls) in enumerate(TURNS):
        text = _model_text(thinking, visible, calls)
        # the engine's ids for this turn: what it would sample (the special end-of-turn token included)
        ids = encode(text) + [im_end]
        start = len(traj.response_ids)
        traj.add_model_turn(ids, [-0.1 * (turn + 1)] * len(ids), [turn] * len(ids))
        spans.append(("model", start, len(ids), turn))
        parsed = parse_tool_calls(text, {"python"})
        assert parsed == [ToolCall("python", c["function"]["arguments"]) for c in calls]
        if tool_calls_as == "structured":
            content = f"<think>\n{thinking}\n</think>\n\n{visible}"
            messages.append(
                {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            )
        else:
            messages.append({"role": "assistant", "content": text})
        if not calls:
            break
        replies = [{"role": "tool", "content": out} for out in OUTPUTS[turn]]
        env = renderer.messages_ids(replies, ids)
        start = len(traj.response_ids)
        traj.add_env_turn(env)
        spans.append(("env", start, len(env), turn))
        messages += replies

    rendered = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert rendered.count("<tool_response>") == 3 and rendered.count("<|im_start|>user") == 3
    assert traj.ids + encode("\n") == encode(rendered)  # the template ends the last turn with a newline

    assert traj.turn_starts == [start for _, start, _, _ in spans]
    assert traj.model_turns == [kind == "model" for kind, _, _, _ in spans]
    for kind, start, n, turn in spans:
        window = slice(start, start + n)
        model = kind == "model"
        assert traj.loss_mask[window] == [int(model)] * n
        assert traj.logprobs[window] == ([-0.1 * (turn + 1)] * n if model else [0.0] * n)
        assert traj.versions[window] == [turn] * n  # environment tokens: the version of the turn before them
    assert traj.model_tokens == sum(n for kind, _, n, _ in spans if kind == "model")
    # each environment turn opens the next assistant turn, so the next model turn is generated from there
    for kind, start, n, _ in spans:
        if kind == "env":
            assert tok.decode(traj.response_ids[start : start + n]).endswith("<|im_start|>assistant\n")


def test_where_the_template_rewrites_a_turn_the_trajectory_keeps_the_sampled_ids(tok):
    """Qwen3's template strips newlines around the thinking, so a turn written "<think>\\n\\nR" renders
    differently: re-rendering the conversation would train on ids the model never sampled; the trajectory
    keeps the sampled ones."""
    im_end = im_end_id(tok)
    text = "<think>\n\nhmm\n</think>\n\nThe answer is 4."
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False
    )
    traj = Trajectory(tok.encode(prompt, add_special_tokens=False))
    sampled = tok.encode(text, add_special_tokens=False) + [im_end]
    traj.add_model_turn(sampled, [-1.0] * len(sampled), [0] * len(sampled))
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": text}], tokenize=False
    )
    assert tok.encode(rendered, add_special_tokens=False) != traj.ids + tok.encode(
        "\n", add_special_tokens=False
    )
    assert traj.response_ids == sampled


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    """A template whose rendering of the model's turn depends on what follows it cannot be appended to
    token-exactly: the renderer says so instead of producing ids that disagree with the conversation."""
    tok = qwen3_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% if loop.last %} (latest){% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="'tool' message\\(s\\) after a model turn changes the text before"):
        EnvTurnRenderer(tok, [im_end_id(tok)]).ids("tool", "6", [im_end_id(tok)])
