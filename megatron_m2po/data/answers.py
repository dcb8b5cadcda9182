"""Answer extraction from text: the last `\\boxed{}` of a solution or a response.

Shared by the prompt files (answers stored inside a boxed `solution`) and the math reward (the response's
answer), so both read a box the same way.
"""

from __future__ import annotations

_BOXED_COMMANDS = ("\\boxed", "\\fbox")


def extract_last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`, braces balanced; None if absent."""
    start = max(text.rfind(cmd) for cmd in _BOXED_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):  # "\boxed 5": the argument is the next token
        rest = text[i + 1 :]
        token = rest.split("$", 1)[0].split(None, 1)
        return token[0] if token else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut off inside the box
