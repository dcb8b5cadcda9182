"""Token-exact multi-turn trajectories (the model's ids kept as sampled, the environment's rendered by the
chat template) and the tool-call parser that answers every malformed call instead of raising."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.queue.codec import decode_group, encode_group
from megatron_m2po.rollout.environments.tool_calls import ToolCall, ToolCallError, parse_tool_calls
from megatron_m2po.rollout.environments.trajectory import EnvTurnRenderer, Trajectory
from megatron_m2po.trainer.batching import groups_to_rows, rows_to_microbatch
from megatron_m2po.types import Group

TOOLS = frozenset({"python"})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(
        make_tiny_model("qwen3", tmp_path_factory.mktemp("tok") / "m", seed=0)
    )


def _model_turn(tok, text, *, eos=True):
    ids = tok.encode(text, add_special_tokens=False)
    return ids + ([tok.convert_tokens_to_ids("<|im_end|>")] if eos else [])


@pytest.mark.parametrize("first_turn_ends", [True, False], ids=["eos", "cut_by_length"])
def test_ids_are_the_chat_templates_rendering_and_masks_align_at_every_turn(tok, first_turn_ends):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    call = '<tool_call>{"name": "python", "arguments": {"code": "print(2*3)"}}</tool_call>'
    reply = "<tool_response>\n6\n</tool_response>"
    answer = "The answer is 6."
    messages = [{"role": "user", "content": "What is 2*3?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    traj = Trajectory(tok.encode(prompt, add_special_tokens=False))
    renderer = EnvTurnRenderer(tok, [im_end])

    first = _model_turn(tok, "Let me run it." + call, eos=first_turn_ends)
    traj.add_model_turn(first, [-0.5] * len(first), [3] * len(first))
    env = renderer.ids("tool", reply, first)
    traj.add_env_turn(env)
    second = _model_turn(tok, answer)
    traj.add_model_turn(second, [-0.25] * len(second), [4] * len(second))  # a weight update in between

    messages += [
        {"role": "assistant", "content": "Let me run it." + call},
        {"role": "tool", "content": reply},
        {"role": "assistant", "content": answer},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert traj.ids + tok.encode("\n", add_special_tokens=False) == tok.encode(
        rendered, add_special_tokens=False
    )

    n1, ne = len(first), len(env)
    assert traj.turn_starts == [0, n1, n1 + ne] and traj.model_turns == [True, False, True]
    assert traj.loss_mask == [1] * n1 + [0] * ne + [1] * len(second)
    assert traj.logprobs == [-0.5] * n1 + [0.0] * ne + [-0.25] * len(second)
    assert traj.versions == [3] * n1 + [3] * ne + [4] * len(second)
    assert traj.model_tokens == n1 + len(second)
    # The environment's ids begin by closing the model's turn where the model did not (cut by length).
    assert (env[0] == im_end) is (not first_turn_ends)
    # As a Sample through the journal and into the trainer's rows: the mask selects the model's turns only.
    sample = decode_group(
        b"".join(encode_group(Group("q", traj.prompt_ids, [traj.to_sample("q", 0, "stop")]))[0])
    ).samples[0]
    assert (sample.response_ids, sample.loss_mask, sample.turn_starts) == (
        traj.response_ids,
        traj.loss_mask,
        traj.turn_starts,
    )
    mb = rows_to_microbatch(
        groups_to_rows([Group("q", traj.prompt_ids, [sample])], torch.ones(1)), consumer_version=4, pad_id=0
    )
    p = len(traj.prompt_ids)
    assert mb.response_mask[0, p - 1 :].tolist() == [float(m) for m in traj.loss_mask]
    assert mb.staleness[0, p - 1 :].tolist() == [4 - v for v in traj.versions]


def test_a_model_turn_with_misaligned_arrays_is_refused():
    with pytest.raises(ValueError, match="2 ids but 1 log-probs and 2 versions"):
        Trajectory([1]).add_model_turn([5, 6], [-1.0], [0, 0])


def test_tool_calls_are_parsed_and_every_malformed_one_is_an_error_reply():
    ok = '<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>'
    as_string = '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"2\\"}"}</tool_call>'
    assert parse_tool_calls("no call here", TOOLS) == []
    assert parse_tool_calls(ok + " and " + as_string, TOOLS) == [
        ToolCall("python", {"code": "1"}),
        ToolCall("python", {"code": "2"}),
    ]
    cases = {
        "<tool_call>{not json</tool_call>": "tool call 1: not valid JSON",
        '<tool_call>{"name": "shell", "arguments": {}}</tool_call>': "unknown tool 'shell' (available: python)",
        '<tool_call>["python"]</tool_call>': "expected an object",
        '<tool_call>{"arguments": {}}</tool_call>': '"name" must be a string',
        '<tool_call>{"name": "python", "arguments": [1]}</tool_call>': '"arguments" must be an object',
        '<tool_call>{"name": "python", "arguments": "nope"}</tool_call>': "is a string that is not a JSON object",
        ok + '<tool_call>{"name": "python", "argu': "tool call 2: not closed with </tool_call>",
        "<tool_call>" + "[" * 100_000 + "</tool_call>": "not valid JSON",
    }
    for text, message in cases.items():
        result = parse_tool_calls(text, TOOLS)[-1]
        assert isinstance(result, ToolCallError) and message in result.message, (text[:80], result)


@given(st.text(alphabet=st.sampled_from(list('<>/{}[]":, abcnmepythontool_call\\')), max_size=200))
@example('<tool_call>{"name": "python", "arguments": {"code": "x"}}</tool_call><tool_call>')
@example("<tool_call></tool_call>")
def test_the_parser_never_raises_and_accounts_for_every_opened_call(text):
    results = parse_tool_calls(text, TOOLS)
    closed = text.count("<tool_call>") >= 1
    assert all(isinstance(r, (ToolCall, ToolCallError)) for r in results)
    assert bool(results) == closed
    for r in results:
        if isinstance(r, ToolCall):
            assert r.name == "python" and isinstance(r.arguments, dict)
            json.dumps(r.arguments)
