"""Reference optima written independently of pipepartition, to check partition_balanced.

Shared by the tests and ``tools/bench_partition.py`` (which puts this folder on sys.path).
Nothing here imports pipepartition: a reference that used the code under test would prove
nothing.

- :func:`brute_force_optimum` tries every split: exact, with speeds and capacities, for a
  handful of items.
- :func:`least_bottleneck` bisects over :func:`parts_needed`, a plain greedy: exact for
  integer weights without speeds or capacities, and fast enough for 100,000 items.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from itertools import accumulate

Number = int | float


def all_splits(num_items: int, num_parts: int) -> Iterator[list[int]]:
    """Every split into ``num_parts`` non-empty contiguous parts."""
    for cuts in itertools.combinations(range(1, num_items), num_parts - 1):
        yield [0, *cuts, num_items]


def bottleneck(
    weights: Sequence[Number], boundaries: Sequence[int], speeds: Sequence[float] | None = None
) -> Number:
    """max over parts of (sum of weights) / speed, sums as prefix-sum differences."""
    prefix = list(accumulate((float(w) for w in weights) if speeds else weights, initial=0))
    times = [prefix[boundaries[s + 1]] - prefix[boundaries[s]] for s in range(len(boundaries) - 1)]
    if speeds:
        times = [time / speed for time, speed in zip(times, speeds, strict=True)]
    return max(times)


def fits(sizes: Sequence[Number], capacities: Sequence[Number], boundaries: Sequence[int]) -> bool:
    """Whether every part's summed sizes stay within its capacity."""
    prefix = list(accumulate(sizes, initial=0))
    return all(
        prefix[boundaries[s + 1]] - prefix[boundaries[s]] <= capacity
        for s, capacity in enumerate(capacities)
    )


def brute_force_optimum(
    weights: Sequence[Number],
    num_parts: int,
    speeds: Sequence[float] | None = None,
    capacities: Sequence[Number] | None = None,
    sizes: Sequence[Number] | None = None,
) -> Number | None:
    """The smallest bottleneck over all feasible splits, or None when none is feasible."""
    feasible = [
        split
        for split in all_splits(len(weights), num_parts)
        if capacities is None or fits(sizes if sizes is not None else weights, capacities, split)
    ]
    if not feasible:
        return None
    return min(bottleneck(weights, split, speeds) for split in feasible)


def parts_needed(weights: Sequence[int], limit: int) -> int:
    """Fewest contiguous parts with every part's sum at most ``limit`` (greedy, O(n)).

    ``len(weights) + 1`` when one weight alone exceeds ``limit``: no number of parts does.
    """
    needed, load = 1, 0
    for weight in weights:
        if weight > limit:
            return len(weights) + 1
        if load + weight > limit:
            needed, load = needed + 1, 0
        load += weight
    return needed


def least_bottleneck(weights: Sequence[int], num_parts: int) -> int:
    """The smallest achievable bottleneck, by binary search over :func:`parts_needed`."""
    low, high = max(weights) - 1, sum(weights)  # low never suffices, high always does
    while high - low > 1:
        middle = (low + high) // 2
        if parts_needed(weights, middle) <= num_parts:
            high = middle
        else:
            low = middle
    return high


def part_loads(part_sizes: Sequence[Sequence[Number]], boundaries: Sequence[int]) -> list[Number]:
    """What each part's items weigh by that part's own sizes (plain sums, no prefix sums)."""
    return [
        sum(part_sizes[s][boundaries[s] : boundaries[s + 1]]) for s in range(len(boundaries) - 1)
    ]


def least_common_raise(
    part_sizes: Sequence[Sequence[int]], capacities: Sequence[int], num_items: int
) -> int:
    """The least ``d >= 0`` such that some split meets every ``capacities[s] + d``."""
    return min(
        max(
            max(int(load) - capacity, 0)
            for load, capacity in zip(part_loads(part_sizes, split), capacities, strict=True)
        )
        for split in all_splits(num_items, len(capacities))
    )
