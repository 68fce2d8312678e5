"""Constant-time range maxima over a fixed list (a sparse table)."""

from __future__ import annotations

from collections.abc import Callable

from pipepartition._numbers import Real


class RangeMax:
    """Answers "largest value in ``values[lo..hi]``" in O(1) after O(n log n) set-up."""

    def __init__(self, values: list[Real]) -> None:
        self._levels: list[list[Real]] = [values]
        width = 1
        while 2 * width <= len(values):
            previous = self._levels[-1]
            self._levels.append(list(map(max, previous[: len(previous) - width], previous[width:])))
            width *= 2

    def maximum(self, lo: int, hi: int) -> Real:
        """Largest value with index in ``[lo, hi]`` (both inclusive, ``lo <= hi``)."""
        level = (hi - lo + 1).bit_length() - 1
        row = self._levels[level]
        return max(row[lo], row[hi - (1 << level) + 1])

    def positions_where(self, lo: int, hi: int, exceeds: Callable[[Real], bool]) -> list[int]:
        """Sorted indices in ``[lo, hi]`` whose value satisfies the monotone test ``exceeds``.

        ``exceeds`` must be monotone (if it holds for a value it holds for every larger one),
        so a range whose maximum fails it can be skipped whole. Costs O(k log n) for k hits.
        """
        found: list[int] = []
        pending = [(lo, hi)] if lo <= hi else []
        while pending:
            left, right = pending.pop()
            if not exceeds(self.maximum(left, right)):
                continue
            if left == right:
                found.append(left)
                continue
            middle = (left + right) // 2
            # Right half first onto the stack, so the left half is popped (and found) first.
            pending.append((middle + 1, right))
            pending.append((left, middle))
        return found
