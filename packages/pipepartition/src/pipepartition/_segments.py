"""Which runs of consecutive layers each stage can hold under a given bottleneck.

Positions are the n + 1 gaps between layers: position ``i`` lies just before layer ``i``. A
stage holds the layers between two positions, ``[start, end)``. Under a bottleneck ``B`` it
*fits* that run when its time, ``cost / speed``, is at most ``B`` and, with capacities, its
size is at most the stage's capacity. Both tests are monotone in containment, so for a start
the fitting ends form a range ``start..furthest_end``; a stage must also hold at least one
layer, so a layer too big for a stage on its own *blocks* that stage from starting there.

[Note: exact arithmetic] Costs of runs are prefix-sum differences, ``prefix[end] -
prefix[start]``, everywhere (search, placement, :class:`PartitionPlan`). For ints that is
exact. For floats ``bisect`` only gives a first guess; every answer is then settled with the
very comparison used to define the objective, so results are exact with respect to those
prefix sums. See ``_balanced`` for why this makes the float optimum exact too.
"""

from __future__ import annotations

import copy
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from itertools import accumulate
from operator import itemgetter, sub
from typing import NamedTuple

from pipepartition._numbers import Real, all_ints
from pipepartition._range_max import RangeMax

Intervals = list[tuple[int, int]]
"""Sorted, disjoint, non-adjacent closed ranges ``(first, last)`` of positions."""

Fits = Callable[[int], bool]


class Sweep(NamedTuple):
    """What :meth:`SegmentModel.sweep_forward` found for one bottleneck."""

    reach: list[Intervals]
    feasible: bool
    next_change: Real
    """Smallest time above the bottleneck that the sweep compared against it (a run that
    just did not fit, a layer too heavy alone). Below it every comparison, and so the whole
    sweep, comes out the same: a failed sweep fails for every bottleneck below it."""


def _settle_end(values: list[Real], start: int, end: int, last: int, fits: Fits) -> int:
    """Largest ``e`` in ``[start, last]`` with ``fits(e)``, given a guess ``end`` near it.

    Steps over whole runs of equal prefix values at once: they all answer alike, and a long
    run of zero-cost layers must not cost a step per layer.
    """
    while end > start and not fits(end):
        end = max(start, bisect_left(values, values[end], start, end) - 1)
    while end < last and fits(end + 1):
        end = bisect_right(values, values[end + 1], end + 1, last + 1) - 1
    return end


def _settle_start(values: list[Real], first: int, start: int, end: int, fits: Fits) -> int:
    """Smallest ``a`` in ``[first, end]`` with ``fits(a)``, given a guess ``start`` near it."""
    while start < end and not fits(start):
        start = bisect_right(values, values[start], start, end + 1)
    while start > first and fits(start - 1):
        start = bisect_left(values, values[start - 1], first, start)
    return start


_UNDERFLOW = 1e-323
"""Twice the smallest subnormal double: more than any division can lose to underflow
(``5e-324 / 2.0 == 0.0``), so ``time <= bound`` implies ``cost <= (bound + _UNDERFLOW) *
speed`` up to relative rounding."""


def _generous(room: Real, scale: Real) -> float:
    """``room`` widened far beyond any float rounding in sums of at most ``scale``: pruning
    with it never drops a position that could work."""
    return float(room) * (1.0 + 1e-9) + abs(float(scale)) * 1e-12


def _merged(pieces: Intervals, lowest: int, highest: int) -> Intervals:
    """Union of ``pieces`` clipped to ``[lowest, highest]``, as :data:`Intervals`."""
    pieces.sort()
    merged: Intervals = []
    for first, last in pieces:
        first = max(first, lowest)
        last = min(last, highest)
        if first > last:
            continue
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


class SegmentModel:
    """Per-stage limits on runs of layers; answers reachability questions for a bottleneck.

    ``exact`` promises that ``costs`` are all ints and there are no ``speeds``: then
    ``bisect`` answers are final. Otherwise ``costs`` must be all floats.
    """

    def __init__(
        self,
        costs: list[Real],
        num_stages: int,
        *,
        exact: bool,
        speeds: list[Real] | None,
        capacities: list[Real] | None,
        part_sizes: list[list[Real]],
    ) -> None:
        self.num_items = len(costs)
        self.num_stages = num_stages
        self.speeds = speeds
        self.prefix: list[Real] = list(accumulate(costs, initial=0))
        self.exact = exact
        # The cost of one layer as the objective sees it (a prefix difference, see the note).
        self.item_costs = costs if self.exact else list(map(sub, self.prefix[1:], self.prefix))
        self.max_item_cost: Real = max(self.item_costs, default=0)
        # Sizes per stage (stages given the same list share its prefix sums and table), and
        # their envelope: each layer's smallest size on any stage, a sound bound for pruning
        # and, when every stage shares one list, simply that list.
        self.shared_sizes = all(sizes is part_sizes[0] for sizes in part_sizes)
        self.part_size_prefix: list[list[Real]] = []
        self.part_item_sizes: list[list[Real]] = []
        self.size_prefix: list[Real] = []
        self.item_sizes: list[Real] = []
        self.max_item_size: Real = 0
        self._size_tables: dict[int, RangeMax] = {}
        if capacities is not None:
            computed: dict[int, tuple[list[Real], list[Real]]] = {}
            for sizes in part_sizes:
                if id(sizes) not in computed:
                    prefix = list(accumulate(sizes, initial=0))
                    items = sizes if all_ints(sizes) else list(map(sub, prefix[1:], prefix))
                    computed[id(sizes)] = (prefix, items)
            self.part_size_prefix = [computed[id(sizes)][0] for sizes in part_sizes]
            self.part_item_sizes = [computed[id(sizes)][1] for sizes in part_sizes]
            if self.shared_sizes:
                self.size_prefix, self.item_sizes = computed[id(part_sizes[0])]
            else:
                self.item_sizes = [
                    min(column) for column in zip(*self.part_item_sizes, strict=True)
                ]
                self.size_prefix = list(accumulate(self.item_sizes, initial=0))
            self.max_item_size = max(self.item_sizes, default=0)
        self.part_max_item_size: list[Real] = [
            max(items, default=0) for items in self.part_item_sizes
        ]
        self._cost_table: RangeMax | None = None
        # Total speed / capacity of stages s.. and of stages ..s-1, for pruning positions
        # the other stages could never make up for (see lowest_start / highest_start).
        weights_per_stage: list[Real] = speeds if speeds is not None else [1] * num_stages
        self._speed_after = list(accumulate(reversed(weights_per_stage), initial=0))[::-1]
        self._speed_before = list(accumulate(weights_per_stage, initial=0))
        self._set_capacities(capacities)

    def _set_capacities(self, capacities: list[Real] | None) -> None:
        self.capacities = capacities
        self._capacity_after: list[Real] | None = None
        self._capacity_before: list[Real] | None = None
        if capacities is not None and math.inf not in capacities:
            self._capacity_after = list(accumulate(reversed(capacities), initial=0))[::-1]
            self._capacity_before = list(accumulate(capacities, initial=0))
        self._exact_sizes = capacities is None or (
            all_ints(capacities) and all(all_ints(items) for items in self.part_item_sizes)
        )

    @property
    def exact_sizes(self) -> bool:
        """Whether sizes and capacities are all ints, so size comparisons are exact."""
        return self._exact_sizes

    def with_capacities(self, capacities: list[Real]) -> SegmentModel:
        """This model with other capacities (its size and cost tables shared, not rebuilt)."""
        model = copy.copy(self)
        model._set_capacities(capacities)
        return model

    def stage_size(self, stage: int, start: int, end: int) -> Real:
        """What layers ``[start, end)`` weigh against stage ``stage``'s capacity."""
        sizes = self.part_size_prefix[stage]
        return sizes[end] - sizes[start]

    # -- one stage, one run ------------------------------------------------------------

    def stage_time(self, stage: int, start: int, end: int) -> Real:
        """What the objective charges stage ``stage`` for layers ``[start, end)``."""
        cost = self.prefix[end] - self.prefix[start]
        return cost / self.speeds[stage] if self.speeds is not None else cost

    def path_bottleneck(self, boundaries: list[int]) -> Real:
        """The objective, ``max`` stage time, of a complete list of boundaries."""
        return max(
            self.stage_time(stage, boundaries[stage], boundaries[stage + 1])
            for stage in range(self.num_stages)
        )

    def furthest_end(self, stage: int, start: int, bound: Real) -> int:
        """Largest ``end`` such that stage ``stage`` fits ``[start, end)`` (``start`` if none)."""
        end = self.num_items
        if bound != math.inf:
            prefix = self.prefix
            base = prefix[start]
            if self.speeds is None:
                end = bisect_right(prefix, base + bound, start, end + 1) - 1
                if not self.exact:
                    end = _settle_end(
                        prefix, start, end, self.num_items, lambda e: prefix[e] - base <= bound
                    )
            else:
                speed = self.speeds[stage]
                end = bisect_right(prefix, base + bound * speed, start, end + 1) - 1
                end = _settle_end(
                    prefix,
                    start,
                    end,
                    self.num_items,
                    lambda e: (prefix[e] - base) / speed <= bound,
                )
        if self.capacities is not None:
            capacity = self.capacities[stage]
            if capacity != math.inf:
                sizes = self.part_size_prefix[stage]
                base_size = sizes[start]
                guess = bisect_right(sizes, base_size + capacity, start, end + 1) - 1
                end = _settle_end(
                    sizes, start, guess, end, lambda e: sizes[e] - base_size <= capacity
                )
        return end

    def earliest_start(self, stage: int, end: int, bound: Real) -> int:
        """Smallest ``start`` such that stage ``stage`` fits ``[start, end)``."""
        start = 0
        if bound != math.inf:
            prefix = self.prefix
            top = prefix[end]
            if self.speeds is None:
                start = bisect_left(prefix, top - bound, 0, end + 1)
                if not self.exact:
                    start = _settle_start(prefix, 0, start, end, lambda a: top - prefix[a] <= bound)
            else:
                speed = self.speeds[stage]
                start = bisect_left(prefix, top - bound * speed, 0, end + 1)
                start = _settle_start(
                    prefix, 0, start, end, lambda a: (top - prefix[a]) / speed <= bound
                )
        if self.capacities is not None:
            capacity = self.capacities[stage]
            if capacity != math.inf:
                sizes = self.part_size_prefix[stage]
                top_size = sizes[end]
                guess = max(start, bisect_left(sizes, top_size - capacity, 0, end + 1))
                start = _settle_start(
                    sizes, start, guess, end, lambda a: top_size - sizes[a] <= capacity
                )
        return start

    def blocked(self, stage: int, first: int, last: int, bound: Real) -> list[int]:
        """Sorted layers in ``[first, last]`` that stage ``stage`` cannot hold even alone."""
        if first > last:
            return []
        hits: list[int] = []
        if bound != math.inf:
            speeds = self.speeds
            if speeds is None:

                def too_costly(cost: Real) -> bool:
                    return cost > bound

            else:
                speed = speeds[stage]

                def too_costly(cost: Real) -> bool:
                    return cost / speed > bound

            if too_costly(self.max_item_cost):
                if self._cost_table is None:
                    self._cost_table = RangeMax(self.item_costs)
                hits = self._cost_table.positions_where(first, last, too_costly)
        if self.capacities is not None:
            capacity = self.capacities[stage]
            if self.part_max_item_size[stage] > capacity:
                items = self.part_item_sizes[stage]
                table = self._size_tables.get(id(items))
                if table is None:
                    table = self._size_tables[id(items)] = RangeMax(items)
                too_big = table.positions_where(first, last, lambda size: size > capacity)
                hits = sorted(set(hits).union(too_big)) if hits else too_big
        return hits

    def lowest_start(self, stage: int, bound: Real) -> int:
        """No start of stage ``stage`` below this leaves a rest that stages ``stage..`` could
        hold under ``bound`` and their capacities (a sound, cheap necessary condition)."""
        n = self.num_items
        position = stage
        if bound != math.inf:
            if self.exact:
                room = bound * self._speed_after[stage]
            else:
                room = _generous((bound + _UNDERFLOW) * self._speed_after[stage], self.prefix[n])
            need = self.prefix[n] - room
            position = max(position, bisect_left(self.prefix, need))
        if self._capacity_after is not None:
            room = self._capacity_after[stage]
            total = self.size_prefix[n]
            need = total - (room if self._exact_sizes else _generous(room, total))
            position = max(position, bisect_left(self.size_prefix, need))
        return position

    def highest_start(self, stage: int, bound: Real) -> int:
        """No start of stage ``stage`` above this leaves a prefix that stages ``..stage - 1``
        could hold under ``bound`` and their capacities."""
        n = self.num_items
        position = n - (self.num_stages - stage)
        if bound != math.inf:
            if self.exact:
                room = bound * self._speed_before[stage]
            else:
                room = _generous((bound + _UNDERFLOW) * self._speed_before[stage], self.prefix[n])
            position = min(position, bisect_right(self.prefix, room) - 1)
        if self._capacity_before is not None:
            room = self._capacity_before[stage]
            if not self._exact_sizes:
                room = _generous(room, self.size_prefix[n])
            position = min(position, bisect_right(self.size_prefix, room) - 1)
        return position

    # -- all stages ----------------------------------------------------------------------

    def sweep_forward(self, bound: Real, *, prune_above: Real | None = None) -> Sweep:
        """``reach[s]``: positions where stage ``s`` can begin, stages before it all fitting.

        ``reach[0]`` is position 0 and ``reach[num_stages]`` the positions the last stage can
        end at. Every stage holds at least one layer and leaves at least one per later stage.
        Stops early, with an empty last entry, once no position is reachable.

        ``prune_above``, a bottleneck at least ``bound``, drops starts that could not finish
        even under it (:meth:`lowest_start`): the answer stays the same, the sweep stays
        narrow when a stage cannot hold many layers alone. It is a fixed value, not ``bound``,
        so that ``next_change`` remains valid: pruning does not move as ``bound`` grows.
        """
        n, p = self.num_items, self.num_stages
        reach: list[Intervals] = [[(0, 0)]]
        next_change: Real = math.inf
        for stage in range(p):
            pieces: Intervals = []
            for lo, hi in reach[-1]:
                # Ending at e works from the latest start before e, as far as that start
                # reaches, unless layer e - 1 blocks this stage: then no start ends at e.
                end = self.furthest_end(stage, hi, bound)
                if end < n:
                    overflow = self.stage_time(stage, hi, end + 1)
                    if bound < overflow < next_change:
                        next_change = overflow
                first = lo + 1
                for layer in self.blocked(stage, lo, hi, bound):
                    alone = self.stage_time(stage, layer, layer + 1)
                    if bound < alone < next_change:
                        next_change = alone
                    if first <= layer:
                        pieces.append((first, layer))
                    first = layer + 2
                if first <= end:  # a blocked hi has end == hi < first
                    pieces.append((first, end))
            lowest = stage + 1
            if prune_above is not None:
                lowest = max(lowest, self.lowest_start(stage + 1, prune_above))
            reach.append(_merged(pieces, lowest, n - (p - stage - 1)))
            if not reach[-1]:
                break
        feasible = len(reach) == p + 1 and bool(reach[-1]) and reach[-1][-1][1] == n
        return Sweep(reach, feasible, next_change)

    def latest_boundaries(self, reach: list[Intervals]) -> list[int]:
        """One feasible set of boundaries, each as late as ``reach`` allows."""
        boundaries = [self.num_items]
        for stage in range(self.num_stages - 1, -1, -1):
            end = boundaries[-1]
            intervals = reach[stage]
            _, last = intervals[bisect_left(intervals, end, key=itemgetter(0)) - 1]
            boundaries.append(min(last, end - 1))
        boundaries.reverse()
        return boundaries

    def sweep_backward(self, bound: Real) -> list[Intervals]:
        """``starts[s]``: positions where stage ``s`` can begin with stages ``s..`` all fitting.

        The mirror image of :meth:`sweep_forward`; ``starts[num_stages]`` is the last position.
        """
        n, p = self.num_items, self.num_stages
        starts: list[Intervals] = [[] for _ in range(p)] + [[(n, n)]]
        for stage in range(p - 1, -1, -1):
            pieces: Intervals = []
            for lo, hi in starts[stage + 1]:
                first = self.earliest_start(stage, lo, bound)
                last = hi - 1
                # Layers before lo fit together with the run up to lo; only those in the
                # window can block a start.
                for layer in self.blocked(stage, lo, last, bound):
                    if first <= layer - 1:
                        pieces.append((first, layer - 1))
                    first = layer + 1
                if first <= last:
                    pieces.append((first, last))
            starts[stage] = _merged(pieces, stage, self.highest_start(stage, bound))
        return starts
