"""Partitioning methods as typed values, parsed once from strings at the edge."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

from pipepartition._checks import checked_boundaries
from pipepartition._numbers import non_negative_values

_TYPE_PREFIX = "type:"


@dataclass(frozen=True)
class _Keyword:
    """A method without arguments, spelt as its keyword (``str(Uniform()) == 'uniform'``)."""

    name: ClassVar[str]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Uniform(_Keyword):
    """The same number of layers per stage (give or take one), whatever they cost."""

    name: ClassVar[str] = "uniform"


@dataclass(frozen=True)
class Parameters(_Keyword):
    """Balance the per-layer parameter counts (min-max optimal)."""

    name: ClassVar[str] = "parameters"


@dataclass(frozen=True)
class TypeRegex:
    """Balance the number of layers whose name matches ``pattern``.

    Matching is ``re.search`` ignoring case, against names like ``'Block'``, as DeepSpeed's
    ``'type:REGEX'`` method does. The pattern is compiled on construction.

    Raises:
        TypeError: ``pattern`` is not a str.
        ValueError: ``pattern`` is empty or not a valid regular expression.
    """

    pattern: str
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise TypeError(f"pattern must be a str, got {type(self.pattern).__name__}")
        if not self.pattern:
            raise ValueError(
                "the 'type:' method needs a pattern after the colon, e.g. 'type:Block' or "
                "'type:TransformerLayer'"
            )
        try:
            regex = re.compile(self.pattern, re.IGNORECASE)
        except re.error as error:
            raise ValueError(
                f"'type:{self.pattern}' is not a valid regular expression ({error}); fix the "
                "pattern after 'type:' (it is used verbatim, with re.search, ignoring case)"
            ) from None
        object.__setattr__(self, "regex", regex)

    def matches(self, name: str) -> bool:
        return self.regex.search(name) is not None

    def __str__(self) -> str:
        return f"{_TYPE_PREFIX}{self.pattern}"


@dataclass(frozen=True)
class Profile(_Keyword):
    """Balance measured per-layer costs (e.g. forward + backward seconds)."""

    name: ClassVar[str] = "profile"


@dataclass(frozen=True)
class Boundaries:
    """Use these stage boundaries as given: ``num_stages + 1`` positions from 0.

    Raises:
        TypeError: a boundary is not an int.
        ValueError: fewer than two boundaries, not starting at 0, or decreasing.
    """

    boundaries: Sequence[int]
    """Any sequence of ints; stored as a tuple, so methods stay hashable and immutable."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "boundaries", checked_boundaries(self.boundaries))

    def __str__(self) -> str:
        return "boundaries"


@dataclass(frozen=True)
class Weights:
    """Balance these per-layer weights (min-max optimal).

    Raises:
        TypeError: a weight is not a real number.
        ValueError: a weight is negative or not finite.
    """

    weights: Sequence[float]
    """Any sequence of real numbers; stored as a tuple of floats or ints."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "weights", tuple(non_negative_values(self.weights, name="weights"))
        )

    def __str__(self) -> str:
        return "weights"


PartitionMethod: TypeAlias = Uniform | Parameters | TypeRegex | Profile | Boundaries | Weights
"""Every way of choosing stage boundaries that :func:`plan_partition` understands."""

_KEYWORDS: dict[str, PartitionMethod] = {
    keyword.name: keyword() for keyword in (Uniform, Parameters, Profile)
}
_METHOD_TYPES = (Uniform, Parameters, TypeRegex, Profile, Boundaries, Weights)


def parse_method(method: str | PartitionMethod) -> PartitionMethod:
    """The typed method for a string such as ``'parameters'`` or ``'type:Block'``.

    Keywords ('uniform', 'parameters', 'profile') ignore case and surrounding whitespace.
    ``'type:REGEX'`` takes its prefix in any case; everything after the first ':' is the
    pattern, verbatim (case, backslashes and further colons kept), compiled here. Method
    objects are returned unchanged.

    >>> parse_method(" Parameters ")
    Parameters()
    >>> parse_method(r"TYPE:\\S+Block")
    TypeRegex(pattern='\\\\S+Block')

    Raises:
        TypeError: ``method`` is neither a str nor a method object.
        ValueError: an unknown method, or an invalid regular expression.
    """
    if isinstance(method, _METHOD_TYPES):
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a str or a method object, got {type(method).__name__}: {method!r}"
        )
    text = method.lstrip()
    if text[: len(_TYPE_PREFIX)].lower() == _TYPE_PREFIX:
        return TypeRegex(text[len(_TYPE_PREFIX) :])
    keyword = _KEYWORDS.get(method.strip().lower())
    if keyword is None:
        raise ValueError(
            f"unknown partition method {method!r}; use 'uniform', 'parameters', 'profile' or "
            "'type:REGEX' (e.g. 'type:Block'), or a method object: Uniform(), Parameters(), "
            "Profile(), TypeRegex(pattern), Boundaries(boundaries), Weights(weights)"
        )
    return keyword
