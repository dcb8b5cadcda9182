"""A loss's hyperparameters are its keyword-only parameters: the signature is the one place that says their
names, defaults and allowed values, so the registry, `get_loss`'s checks and the config read them from there.

Allowed values are the annotation's: a `Literal[...]` lists its choices, and a number is bounded with
`annotated_types` constraints (`Positive = Annotated[float, Gt(0)]`); every number must also be finite.
`None` is allowed where the annotation is optional (`X | None`), and means "off" or "the loss's own".
"""

from __future__ import annotations

import inspect
import math
import operator
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt

Positive = Annotated[float, Gt(0)]

# annotated_types constraint -> (its attribute, which is also config `opt`'s keyword; the test; the word)
_BOUNDS = {
    Gt: ("gt", operator.gt, ">"),
    Ge: ("ge", operator.ge, ">="),
    Lt: ("lt", operator.lt, "<"),
    Le: ("le", operator.le, "<="),
}


def keyword_parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """`fn`'s keyword-only parameters (its hyperparameters), in order, with their resolved annotations."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return {
        p.name: p.replace(annotation=hints.get(p.name, Any))
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _optional(tp: Any) -> tuple[Any, bool]:
    """(`tp` without its `None` member, whether `None` is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        rest = [a for a in members if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), len(rest) < len(members)
    return tp, False


def _constraints(tp: Any) -> list[tuple[str, float, Callable[[Any, Any], bool], str]]:
    tp, _ = _optional(tp)
    if typing.get_origin(tp) is not Annotated:
        return []
    out = []
    for c in tp.__metadata__:
        if type(c) in _BOUNDS:
            attr, test, word = _BOUNDS[type(c)]
            out.append((attr, getattr(c, attr), test, word))
    return out


def bounds(tp: Any) -> dict[str, float]:
    """The numeric bounds of an annotation as config's `opt` spells them: {"gt": 0} for `Positive`."""
    return {attr: bound for attr, bound, _, _ in _constraints(tp)}


def choices(tp: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` annotation (optional or not); None for other annotations."""
    tp, _ = _optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check(name: str, value: Any, tp: Any) -> None:
    """Raise ValueError naming `name` when `value` is not allowed by the annotation `tp`."""
    base, nullable = _optional(tp)
    if value is None:
        if not nullable:
            raise ValueError(f"{name} must be set, got None")
        return
    allowed = choices(base)
    if allowed is not None:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        return
    if typing.get_origin(base) is Annotated:
        base = typing.get_args(base)[0]
    if base is not float:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    for attr, bound, test, word in _constraints(tp):
        if not test(value, bound):
            what = (
                "a positive finite number"
                if (attr, bound) == ("gt", 0)
                else f"a finite number {word} {bound}"
            )
            raise ValueError(f"{name} must be {what}, got {value!r}")
