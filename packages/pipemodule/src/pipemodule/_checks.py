"""Checks of single argument values, shared by every pipemodule entry point.

One rule for every package of pipestack: a value of the wrong type raises ``TypeError``, a value
of the right type but out of range raises ``ValueError``; both name the argument, the value and
what to pass instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["boolean", "callable_or_none", "non_negative_int", "positive_int", "require_callable"]


def _integer(name: str, value: object, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; pass an int {hint}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} is too small; pass an int {hint}")
    return value


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1."""
    return _integer(name, value, 1, ">= 1")


def non_negative_int(name: str, value: object, hint: str = "") -> int:
    """``value`` if it is an int >= 0; ``hint`` says what 0 means, e.g. ``(0 disables)``."""
    return _integer(name, value, 0, f">= 0{f' {hint}' if hint else ''}")


def boolean(name: str, value: object) -> bool:
    """``value`` if it is a bool (not merely truthy: ``"no"`` is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; pass True or False")
    return value


def require_callable(name: str, value: object, usage: str) -> Callable[..., Any]:
    """``value`` if it is callable; ``usage`` shows the expected call, e.g. ``fn(seed)``."""
    if not callable(value):
        raise TypeError(f"{name}={value!r} is not callable; pass a function {usage}")
    return value


def callable_or_none(name: str, value: object, usage: str) -> Callable[..., Any] | None:
    """``value`` if it is None or callable."""
    return None if value is None else require_callable(name, value, usage)
