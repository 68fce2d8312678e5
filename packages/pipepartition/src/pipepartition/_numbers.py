"""Checking and normalising the plain numbers that partitioning works on.

Every public entry point turns its numeric inputs into lists of plain ``int`` and ``float``
here, once, so the algorithms never meet a bool, a NaN or a numpy scalar.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

Real = int | float

_PLAIN = frozenset((int, float))


def real_values(values: Iterable[object], *, name: str) -> list[Real]:
    """``values`` as a list of plain ints and floats; TypeError names the first bad element.

    Integral numbers (numpy integers included) become ``int``, other reals become ``float``.
    Bools are refused: a flag passed where a cost belongs is almost always a mistake.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise TypeError(
            f"{name} must be a sequence of numbers, got {type(values).__name__}: {values!r}"
        )
    items = list(values)
    if set(map(type, items)) <= _PLAIN:
        return items  # type: ignore[return-value]  # every element is exactly int or float
    converted: list[Real] = []
    for index, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{name}[{index}] is {value!r} of type {type(value).__name__}; pass plain int or "
                "float values (call .tolist() on an array or tensor first)"
            )
        converted.append(int(value) if isinstance(value, numbers.Integral) else float(value))
    return converted


def all_ints(values: list[Real]) -> bool:
    """True when every element is a plain ``int`` (as :func:`real_values` returns them)."""
    return float not in set(map(type, values))


def non_negative_values(values: Iterable[object], *, name: str) -> list[Real]:
    """Like :func:`real_values`, and every value finite and ``>= 0``."""
    items = real_values(values, name=name)
    if not items:
        return items
    # Fast check first: a NaN or an infinity makes the sum non-finite, and once those are
    # excluded min() is reliable. Only a failure pays for the scan that names the culprit.
    has_float = not all_ints(items)
    if (has_float and not math.isfinite(sum(items))) or min(items) < 0:
        for index, value in enumerate(items):
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{name}[{index}] is {value!r}; every value must be a finite number >= 0"
                )
        raise ValueError(
            f"{name} sum to {sum(items)!r} (floating-point overflow); scale the values down"
        )
    return items


def positive_values(values: Iterable[object], *, name: str, allow_inf: bool) -> list[Real]:
    """Like :func:`real_values`, and every value ``> 0`` (and finite unless ``allow_inf``).

    How many there must be is the caller's rule (``_checks.require_length``).
    """
    items = real_values(values, name=name)
    for index, value in enumerate(items):
        bad = math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf)
        if bad:
            limit = "> 0" if allow_inf else "finite and > 0"
            raise ValueError(f"{name}[{index}] is {value!r}; every value must be {limit}")
    return items


def integer(value: object, *, name: str) -> int:
    """``value`` as a plain ``int``; TypeError for bools and non-integral values."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    return int(value)


def count(value: object, *, name: str, minimum: int) -> int:
    """An ``int`` (not a bool) that is at least ``minimum``."""
    result = integer(value, name=name)
    if result < minimum:
        raise ValueError(f"{name} is {result}; it must be an integer >= {minimum}")
    return result


def counts(values: Iterable[object], *, name: str) -> tuple[int, ...]:
    """Plain ``int`` values ``>= 0``, e.g. parameter counts; the first bad element is named."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise TypeError(
            f"{name} must be a sequence of ints, got {type(values).__name__}: {values!r}"
        )
    return tuple(
        count(value, name=f"{name}[{index}]", minimum=0) for index, value in enumerate(values)
    )


def plural(number: int, singular: str, plural_form: str | None = None) -> str:
    """``1 stage``, ``3 stages``, ``1 entry``, ``2 entries``: for messages about lengths."""
    return f"{number} {singular if number == 1 else plural_form or singular + 's'}"


def entries(number: int) -> str:
    return plural(number, "entry", "entries")


def format_number(value: Real) -> str:
    """Exact for ints, 6 significant digits for floats: what error messages and tables show."""
    if isinstance(value, int):
        return f"{value:,}"
    if value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.6g}"


def format_list(values: Sequence[Real], *, limit: int = 8) -> str:
    """``[a, b, c]``, shortened with ``...`` past ``limit`` entries."""
    shown = ", ".join(format_number(value) for value in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"
