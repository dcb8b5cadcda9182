"""Tool calls in the Qwen2.5 / Qwen3 format, read from a model turn: `<tool_call>{json}</tool_call>`.

The text comes from a policy being trained, so anything can be in it. Every way a call can be wrong
(JSON that does not parse, a missing name, arguments that are not an object, a tool nobody offered, a
call cut off by the token limit) is a `ToolCallError` whose `message` the environment sends back to the
model as the tool's reply: the model learns from it, and the rollout never raises on model output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    message: str


def parse_tool_calls(text: str, tools: frozenset[str] | set[str]) -> list[ToolCall | ToolCallError]:
    """Each `<tool_call>` block of `text` in order, as a call to one of `tools` or the error to reply with.

    An opening tag after the last closed block with no closing tag is a call cut off (by the token limit
    or a stop string) and reads as an error, so a truncated call is answered rather than ignored."""
    out: list[ToolCall | ToolCallError] = []
    end = 0
    for match in _CALL.finditer(text):
        out.append(_parse_one(match.group(1), len(out) + 1, tools))
        end = match.end()
    if CALL_OPEN in text[end:]:
        out.append(
            ToolCallError(
                f"tool call {len(out) + 1}: not closed with {CALL_CLOSE} (cut off?); it was not run"
            )
        )
    return out


def _parse_one(body: str, index: int, tools: frozenset[str] | set[str]) -> ToolCall | ToolCallError:
    where = f"tool call {index}"
    try:
        call = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: thousands of nested brackets
        return ToolCallError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]}); it was not run")
    if not isinstance(call, dict):
        return ToolCallError(
            f'{where}: expected an object {{"name": ..., "arguments": {{...}}}}; it was not run'
        )
    name = call.get("name")
    if not isinstance(name, str):
        return ToolCallError(f'{where}: "name" must be a string; it was not run')
    if name not in tools:
        offered = ", ".join(sorted(tools)) or "none"
        return ToolCallError(f"{where}: unknown tool {name[:100]!r} (available: {offered}); it was not run")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some templates send the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return ToolCallError(
                f'{where}: "arguments" is a string that is not a JSON object; it was not run'
            )
    if not isinstance(arguments, dict):
        return ToolCallError(f'{where}: "arguments" must be an object; it was not run')
    return ToolCall(name, arguments)
