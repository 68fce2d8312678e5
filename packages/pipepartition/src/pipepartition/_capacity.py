"""Explaining, precisely, why per-part capacities cannot be met.

Every message is spoken in the caller's :class:`Vocabulary` (items and parts for
``partition_balanced``, layers and stages for ``plan_partition``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

from pipepartition._numbers import Real, format_list, format_number
from pipepartition._segments import Intervals, SegmentModel
from pipepartition._vocabulary import Vocabulary


def _describe_positions(intervals: Intervals) -> str:
    parts = [f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in intervals[:4]]
    more = ", ..." if len(intervals) > 4 else ""
    return ", ".join(parts) + more


def require_capacities_plausible(model: SegmentModel, words: Vocabulary) -> None:
    """Raise ValueError for the two plain reasons capacities cannot work: one item larger
    than every capacity, or more in total than all capacities together. Cheap; run first."""
    capacities = model.capacities
    if capacities is None:
        return
    n, p = model.num_items, model.num_stages
    item, part = words.item, words.part
    largest = max(capacities)
    if model.max_item_size > largest:
        index = model.item_sizes.index(model.max_item_size)
        raise ValueError(
            f"{item} {index} alone needs {format_number(model.max_item_size)} but the largest "
            f"capacity is {format_number(largest)} ({part} {capacities.index(largest)}); "
            f"raise that capacity to at least {format_number(model.max_item_size)} or split "
            f"{item} {index}"
        )
    total_size = model.size_prefix[n]
    total_capacity = math.fsum(capacities)
    if total_size > total_capacity:
        raise ValueError(
            f"the {words.items(n)} need {format_number(total_size)} in total but the {p} "
            f"capacities {format_list(capacities)} sum to {format_number(total_capacity)}; add "
            f"at least {format_number(total_size - total_capacity)} of capacity or use more "
            f"{part}s"
        )


def explain_capacities(model: SegmentModel, words: Vocabulary) -> None:
    """Raise ValueError saying which part needs how much, when no split fits the capacities.

    Exact: it runs the optimiser's own reachability sweep with the bottleneck unlimited.
    Returns (without raising) only if some split does fit.
    """
    capacities = model.capacities
    if capacities is None:
        return
    n, p = model.num_items, model.num_stages
    item, part = words.item, words.part
    reach = model.sweep_forward(math.inf).reach
    if not reach[-1]:
        stage = len(reach) - 2
        starts = reach[stage]
        smallest = min(min(model.item_sizes[lo : hi + 1]) for lo, hi in starts)
        raise ValueError(
            f"{part} {stage} (capacity {format_number(capacities[stage])}) must hold at least "
            f"one {item}, but every {item} it could start with ({item} "
            f"{_describe_positions(starts)}, given how much the {part}s before it can hold) is "
            f"larger; the smallest needs {format_number(smallest)}; raise capacity {stage} to "
            f"at least {format_number(smallest)} or reorder the capacities"
        )
    furthest = reach[-1][-1][1]
    if furthest < n:
        raise ValueError(
            f"{part}s 0..{p - 1} (capacities {format_list(capacities)}) can hold at most "
            f"{item}s [0, {furthest}) of {n}; the remaining {item}s [{furthest}, {n}) need "
            f"{format_number(model.size_prefix[n] - model.size_prefix[furthest])} more; raise "
            f"the capacities, use more {part}s, or split the largest {item}s"
        )


def require_layout_fits(
    boundaries: Sequence[int],
    sizes: Sequence[Real],
    capacities: Sequence[Real],
    *,
    words: Vocabulary,
    why: str,
) -> None:
    """Raise ValueError naming the first part of a fixed layout whose items exceed its cap."""
    prefix = list(accumulate(sizes, initial=0))
    for part, capacity in enumerate(capacities):
        start, end = boundaries[part], boundaries[part + 1]
        load = prefix[end] - prefix[start]
        if load > capacity:
            raise ValueError(
                f"{words.part} {part} holds {words.item}s [{start}, {end}) that need "
                f"{format_number(load)} but its capacity is {format_number(capacity)}; {why}"
            )
