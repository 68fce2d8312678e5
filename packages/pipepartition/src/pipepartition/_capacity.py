"""Explaining, precisely, why per-part capacities cannot be met.

Every message is spoken in the caller's :class:`Vocabulary` (items and parts for
``partition_balanced``, layers and stages for ``plan_partition``), and every error is a
:class:`CapacityError` carrying the least common raise of the capacities that makes a split
fit (:func:`least_shortfall`), so the caller can say what would fit.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from itertools import accumulate

from pipepartition._capacity_error import CapacityError
from pipepartition._checks import show_boundaries
from pipepartition._numbers import Real, format_list, format_number
from pipepartition._segments import Intervals, SegmentModel
from pipepartition._vocabulary import Vocabulary

_DOUBLE = struct.Struct("<d")
_INT64 = struct.Struct("<q")


def _describe_positions(intervals: Intervals) -> str:
    parts = [f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in intervals[:4]]
    more = ", ..." if len(intervals) > 4 else ""
    return ", ".join(parts) + more


def least_shortfall(model: SegmentModel) -> tuple[Real, tuple[int, ...], int]:
    """The least ``delta`` such that capacities ``c + delta`` admit a split, that split, and
    a part of it that is short of ``delta``; for a model whose capacities admit none.

    Feasibility only grows with ``delta``, so this bisects it: over ints when sizes and
    capacities are ints (exact), else over the bit patterns of non-negative doubles (the
    smallest double that works), each probe the optimiser's own sweep with time unlimited.
    """
    capacities = model.capacities
    if capacities is None:
        raise RuntimeError("internal error in pipepartition: least_shortfall without capacities")
    exact = model.exact_sizes

    def sweep(delta: Real) -> SegmentModel | None:
        raised = model.with_capacities([capacity + delta for capacity in capacities])
        return raised if raised.sweep_forward(math.inf).feasible else None

    largest: Real = max(prefix[-1] for prefix in model.part_size_prefix)
    if exact:
        low, high = 0, int(largest)
        at_int = True
    else:
        low, high = _rank(0.0), _rank(float(largest))
        at_int = False

    def value(position: int) -> Real:
        return position if at_int else _at(position)

    # `low` never fits (the capacities themselves do not), `high` always does: every stage
    # can then hold every run.
    while high - low > 1:
        middle = (low + high) // 2
        if sweep(value(middle)) is None:
            low = middle
        else:
            high = middle
    delta = value(high)
    raised = sweep(delta)
    if raised is None:
        raise RuntimeError(
            "internal error in pipepartition: raising every capacity by the total size fits no "
            "split; please report this"
        )
    boundaries = raised.latest_boundaries(raised.sweep_forward(math.inf).reach)
    overflows = [
        model.stage_size(part, boundaries[part], boundaries[part + 1]) - capacities[part]
        for part in range(model.num_stages)
    ]
    return delta, tuple(boundaries), overflows.index(max(overflows))


def _rank(value: float) -> int:
    """Non-negative doubles are ordered like their bit patterns read as ints."""
    return int(_INT64.unpack(_DOUBLE.pack(value))[0])


def _at(rank: int) -> float:
    return float(_DOUBLE.unpack(_INT64.pack(rank))[0])


def _raise_with_shortfall(model: SegmentModel, message: str) -> None:
    shortfall, boundaries, part = least_shortfall(model)
    raise CapacityError(message, part=part, shortfall=shortfall, boundaries=boundaries)


def _shortfall_message(model: SegmentModel, words: Vocabulary) -> None:
    """The message for stage-dependent sizes: the split closest to fitting, and its gaps."""
    capacities = model.capacities
    if capacities is None:
        return
    shortfall, boundaries, part = least_shortfall(model)
    item, noun = words.item, words.part
    short = []
    for stage in range(model.num_stages):
        start, end = boundaries[stage], boundaries[stage + 1]
        size = model.stage_size(stage, start, end)
        if size > capacities[stage]:
            short.append(
                f"{noun} {stage} holds {item}s [{start}, {end}) that need {format_number(size)}, "
                f"{format_number(size - capacities[stage])} more than its capacity "
                f"{format_number(capacities[stage])}"
            )
    shown = "; ".join(short[:4]) + ("; ..." if len(short) > 4 else "")
    raise CapacityError(
        f"no split of the {words.items(model.num_items)} into {model.num_stages} {noun}s fits "
        f"the capacities {format_list(capacities)}; the closest, boundaries "
        f"{show_boundaries(boundaries)}, is short on {noun} {part}: {shown}; every capacity "
        f"must grow by at least {format_number(shortfall)} for any split to fit, or use more "
        f"{noun}s",
        part=part,
        shortfall=shortfall,
        boundaries=boundaries,
    )


def require_capacities_plausible(model: SegmentModel, words: Vocabulary) -> None:
    """Raise CapacityError for the two plain reasons capacities cannot work: one item larger
    than every capacity, or more in total than all capacities together. Cheap; run first."""
    capacities = model.capacities
    if capacities is None:
        return
    n, p = model.num_items, model.num_stages
    item, part = words.item, words.part
    if not model.shared_sizes:
        # Sizes depend on the stage: the same two tests on each item's smallest size.
        alone = any(
            all(
                sizes[index] > capacity
                for sizes, capacity in zip(model.part_item_sizes, capacities, strict=True)
            )
            for index in range(n)
        )
        if alone or model.size_prefix[n] > math.fsum(capacities):
            _shortfall_message(model, words)
        return
    largest = max(capacities)
    if model.max_item_size > largest:
        index = model.item_sizes.index(model.max_item_size)
        _raise_with_shortfall(
            model,
            f"{item} {index} alone needs {format_number(model.max_item_size)} but the largest "
            f"capacity is {format_number(largest)} ({part} {capacities.index(largest)}); "
            f"raise that capacity to at least {format_number(model.max_item_size)} or split "
            f"{item} {index}",
        )
    total_size = model.size_prefix[n]
    total_capacity = math.fsum(capacities)
    if total_size > total_capacity:
        _raise_with_shortfall(
            model,
            f"the {words.items(n)} need {format_number(total_size)} in total but the {p} "
            f"capacities {format_list(capacities)} sum to {format_number(total_capacity)}; add "
            f"at least {format_number(total_size - total_capacity)} of capacity or use more "
            f"{part}s",
        )


def explain_capacities(model: SegmentModel, words: Vocabulary) -> None:
    """Raise CapacityError saying which part needs how much, when no split fits the capacities.

    Exact: it runs the optimiser's own reachability sweep with the bottleneck unlimited.
    Returns (without raising) only if some split does fit.
    """
    capacities = model.capacities
    if capacities is None:
        return
    n, p = model.num_items, model.num_stages
    item, part = words.item, words.part
    reach = model.sweep_forward(math.inf).reach
    if reach[-1] and reach[-1][-1][1] == n:
        return
    if not model.shared_sizes:
        _shortfall_message(model, words)
    if not reach[-1]:
        stage = len(reach) - 2
        starts = reach[stage]
        smallest = min(min(model.item_sizes[lo : hi + 1]) for lo, hi in starts)
        _raise_with_shortfall(
            model,
            f"{part} {stage} (capacity {format_number(capacities[stage])}) must hold at least "
            f"one {item}, but every {item} it could start with ({item} "
            f"{_describe_positions(starts)}, given how much the {part}s before it can hold) is "
            f"larger; the smallest needs {format_number(smallest)}; raise capacity {stage} to "
            f"at least {format_number(smallest)} or reorder the capacities",
        )
    furthest = reach[-1][-1][1]
    _raise_with_shortfall(
        model,
        f"{part}s 0..{p - 1} (capacities {format_list(capacities)}) can hold at most "
        f"{item}s [0, {furthest}) of {n}; the remaining {item}s [{furthest}, {n}) need "
        f"{format_number(model.size_prefix[n] - model.size_prefix[furthest])} more; raise "
        f"the capacities, use more {part}s, or split the largest {item}s",
    )


def require_layout_fits(
    boundaries: Sequence[int],
    part_sizes: Sequence[Sequence[Real]],
    capacities: Sequence[Real],
    *,
    words: Vocabulary,
    why: str,
) -> None:
    """Raise CapacityError naming the first part of a fixed layout whose items exceed its cap.

    ``part_sizes[s]`` are the item sizes as part ``s`` counts them.
    """
    prefixes: dict[int, list[Real]] = {}
    loads: list[Real] = []
    for part in range(len(capacities)):
        sizes = part_sizes[part]
        prefix = prefixes.get(id(sizes))
        if prefix is None:
            prefix = prefixes[id(sizes)] = list(accumulate(sizes, initial=0))
        loads.append(prefix[boundaries[part + 1]] - prefix[boundaries[part]])
    overflows = [load - capacity for load, capacity in zip(loads, capacities, strict=True)]
    for part, capacity in enumerate(capacities):
        start, end = boundaries[part], boundaries[part + 1]
        if loads[part] > capacity:
            worst = overflows.index(max(overflows))
            raise CapacityError(
                f"{words.part} {part} holds {words.item}s [{start}, {end}) that need "
                f"{format_number(loads[part])} but its capacity is {format_number(capacity)}; "
                f"{why}",
                part=worst,
                shortfall=overflows[worst],
                boundaries=tuple(boundaries),
            )
