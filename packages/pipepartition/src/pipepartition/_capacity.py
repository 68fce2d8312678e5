"""Explaining, precisely, why per-stage capacities cannot be met."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

from pipepartition._numbers import Real, format_list, format_number
from pipepartition._segments import Intervals, SegmentModel

_FIX = "raise the capacities, use more stages, or split the largest layers"


def _describe_positions(intervals: Intervals) -> str:
    parts = [f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in intervals[:4]]
    more = ", ..." if len(intervals) > 4 else ""
    return ", ".join(parts) + more


def require_capacities_plausible(model: SegmentModel) -> None:
    """Raise ValueError for the two plain reasons capacities cannot work: one layer larger
    than every capacity, or more in total than all capacities together. Cheap; run first."""
    capacities = model.capacities
    if capacities is None:
        return
    n, p = model.num_items, model.num_stages
    largest = max(capacities)
    if model.max_item_size > largest:
        layer = model.item_sizes.index(model.max_item_size)
        raise ValueError(
            f"layer {layer} alone needs {format_number(model.max_item_size)} but the largest "
            f"capacity is {format_number(largest)} (stage {capacities.index(largest)}); "
            f"raise that capacity to at least {format_number(model.max_item_size)} or split "
            f"layer {layer}"
        )
    total_size = model.size_prefix[n]
    total_capacity = math.fsum(capacities)
    if total_size > total_capacity:
        raise ValueError(
            f"the {n} layers need {format_number(total_size)} in total but the {p} capacities "
            f"{format_list(capacities)} sum to {format_number(total_capacity)}; add at least "
            f"{format_number(total_size - total_capacity)} of capacity or use more stages"
        )


def explain_capacities(model: SegmentModel) -> None:
    """Raise ValueError saying which stage needs how much, when no split fits the capacities.

    Exact: it runs the optimiser's own reachability sweep with the bottleneck unlimited.
    Returns (without raising) only if some split does fit.
    """
    capacities = model.capacities
    if capacities is None:
        return
    n, p = model.num_items, model.num_stages
    reach = model.sweep_forward(math.inf).reach
    if not reach[-1]:
        stage = len(reach) - 2
        starts = reach[stage]
        smallest = min(min(model.item_sizes[lo : hi + 1]) for lo, hi in starts)
        raise ValueError(
            f"stage {stage} (capacity {format_number(capacities[stage])}) must hold at least "
            f"one layer, but every layer it could start with (layer {_describe_positions(starts)}, "
            f"given how much the stages before it can hold) is larger; the smallest needs "
            f"{format_number(smallest)}; raise capacity {stage} to at least "
            f"{format_number(smallest)} or reorder the capacities"
        )
    furthest = reach[-1][-1][1]
    if furthest < n:
        raise ValueError(
            f"stages 0..{p - 1} (capacities {format_list(capacities)}) can hold at most layers "
            f"[0, {furthest}) of {n}; the remaining layers [{furthest}, {n}) need "
            f"{format_number(model.size_prefix[n] - model.size_prefix[furthest])} more; {_FIX}"
        )


def require_layout_fits(
    boundaries: Sequence[int], sizes: Sequence[Real], capacities: Sequence[Real], *, why: str
) -> None:
    """Raise ValueError naming the first stage of a fixed layout whose layers exceed its cap."""
    prefix = list(accumulate(sizes, initial=0))
    for stage, capacity in enumerate(capacities):
        start, end = boundaries[stage], boundaries[stage + 1]
        load = prefix[end] - prefix[start]
        if load > capacity:
            raise ValueError(
                f"stage {stage} holds layers [{start}, {end}) that need {format_number(load)} "
                f"but its capacity is {format_number(capacity)}; {why}"
            )
