"""Argument checks shared by pipetopo's modules, and the exception a wrongly typed one raises."""

from __future__ import annotations

import operator


class WrongTypeError(TypeError, ValueError):
    """An argument of the wrong type, e.g. ``dims=[2.0]`` or ``group_for(3)``.

    It is a ``TypeError``, which is what a wrong type is. It is also a ``ValueError`` because
    DeepSpeed's topology, and code written against it, treat every bad topology argument as a
    bad value (``except ValueError``); a caller that catches either keeps working. Raised by
    every pipetopo check of an argument's type, so there is one name to catch.
    """


def as_int(value: object, what: str) -> int:
    """``value`` as an int (numpy integers included); bools and floats raise `WrongTypeError`.

    ``what`` names the argument in the message, e.g. ``"rank"`` or ``"dims entry 2.0"``.
    """
    if isinstance(value, bool):
        raise WrongTypeError(f"{what} must be an int, got the bool {value!r}; pass an int.")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise WrongTypeError(
            f"{what} must be an int, got {value!r} of type {type(value).__name__}; pass an int."
        ) from None
