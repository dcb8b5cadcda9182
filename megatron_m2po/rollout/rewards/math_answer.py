"""Math answer reward: last \\boxed{} of the response checked against the gold answer with math-verify.

Runs inside a RewardPool worker process; math-verify's own signal-based timeouts are
disabled here because the pool's parent enforces the per-sample timeout (signals only
work in a main thread, and a hung sympy call must be killable from outside).
"""

from __future__ import annotations

import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from megatron_m2po.data.answers import extract_last_boxed

_INTEGER = re.compile(r"[+-]?[0-9]+")
_GOLD_CONFIG = [LatexExtractionConfig(), ExprExtractionConfig()]
_PRED_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _parse_math(expr: str, config) -> list:
    return parse(f"${expr}$", extraction_config=config, parsing_timeout=None)


def math_reward(response: str, answer: str, *, format_reward: float = 0.0) -> float:
    """1.0 if the last boxed answer of `response` equals `answer` (math-verify), else `format_reward` when an
    answer was extracted but is wrong (the paper uses 0.1; the released code 0.0), else 0.0."""
    boxed = extract_last_boxed(response)
    if boxed is None or not boxed.strip():
        return 0.0
    gold, pred = str(answer).strip(), boxed.strip()
    if _INTEGER.fullmatch(gold) and _INTEGER.fullmatch(pred):  # math-verify's verdict, without its sympy parse
        return 1.0 if int(gold) == int(pred) else float(format_reward)
    return 1.0 if verified(boxed, answer) else float(format_reward)


def verified(boxed: str, answer: str) -> bool:
    """math-verify: the boxed text equals the gold answer (parsed with sympy; slow, ~10 ms a call)."""
    gold = _parse_math(str(answer), _GOLD_CONFIG)
    pred = _parse_math(boxed, _PRED_CONFIG)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def math_reward_with_format(response: str, answer: str) -> float:
    """The paper's variant: 1.0 correct, 0.1 for an extracted but wrong answer, 0.0 without an answer."""
    return math_reward(response, answer, format_reward=0.1)
