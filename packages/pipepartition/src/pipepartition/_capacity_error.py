"""The error raised when no split meets the capacities, with what would make one fit."""

from __future__ import annotations

from pipepartition._numbers import Real


class CapacityError(ValueError):
    """No split (or not the given one) keeps every part within its capacity.

    A ``ValueError`` whose message says which part needs how much; the same facts as values,
    for callers that explain them in their own words (``pipemodule`` speaks of bytes):

    Attributes:
        part: a part that needs ``shortfall`` more than its capacity in ``boundaries``.
        shortfall: the least amount that, added to every capacity, lets a split fit (for a
            layout that was given rather than searched, the amount that layout lacks): the
            split closest to fitting is short of exactly this much.
        boundaries: that closest split (the given layout, if one was given).
    """

    def __init__(
        self, message: str, *, part: int, shortfall: Real, boundaries: tuple[int, ...]
    ) -> None:
        super().__init__(message)
        self.part = part
        self.shortfall = shortfall
        self.boundaries = boundaries


CapacityError.__module__ = "pipepartition"  # tracebacks show its public name
