"""Min-max optimal contiguous partitioning, for heterogeneous stages and with capacities.

[Note: why the search is exact] Feasibility of a bottleneck ``B`` is monotone in ``B`` and
only changes at values the objective can take (a run's time, ``cost / speed``). For ints the
search bisects integers. For floats it bisects the *bit patterns* of non-negative doubles,
which are ordered like the doubles themselves, so at most 64 probes separate an infeasible
double from the next feasible one: the answer is the smallest double for which a split
exists, i.e. exactly the optimum as the prefix sums define it.

Both ends snap, so the search usually ends after a handful of probes: after a feasible
probe the upper end drops to the bottleneck that probe's split actually achieves; after an
infeasible one the lower end rises to just below the smallest value at which that sweep
could have decided differently (``Sweep.next_change``).
"""

from __future__ import annotations

import logging
import math
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate

from pipepartition._capacity import (
    explain_capacities,
    require_capacities_plausible,
    require_layout_fits,
)
from pipepartition._checks import Constraints, checked_constraints
from pipepartition._numbers import Real, all_ints, count, non_negative_values
from pipepartition._segments import Intervals, SegmentModel
from pipepartition._uniform import partition_uniform
from pipepartition._vocabulary import ITEMS, Vocabulary

logger = logging.getLogger(__name__)

_DOUBLE = struct.Struct("<d")
_INT64 = struct.Struct("<q")


def _double_rank(value: Real) -> int:
    return int(_INT64.unpack(_DOUBLE.pack(float(value)))[0])


def _double_at(rank: int) -> float:
    return float(_DOUBLE.unpack(_INT64.pack(rank))[0])


def _int_rank(value: Real) -> int:
    return int(value)


def _int_at(rank: int) -> int:
    return rank


def partition_balanced(
    weights: Sequence[float],
    num_parts: int,
    *,
    speeds: Sequence[float] | None = None,
    capacities: Sequence[float] | None = None,
    sizes: Sequence[float] | None = None,
    part_sizes: Sequence[Sequence[float]] | None = None,
) -> list[int]:
    """Boundaries of the contiguous split whose heaviest part is as light as possible.

    Part ``s`` holds items ``boundaries[s]`` up to, not including, ``boundaries[s + 1]``.

    Objective: minimise the bottleneck ``max_s cost_s / speed_s``, where ``cost_s`` is the
    sum of the part's weights and ``speed_s`` is 1 unless ``speeds`` gives one positive
    factor per part (a part twice as fast may take twice the weight). With ``capacities``
    (one per part, ``math.inf`` allowed) the sum of ``sizes`` in part ``s`` may not exceed
    ``capacities[s]``; ``sizes`` are per item and default to ``weights``. When an item
    weighs differently depending on the part that holds it, pass ``part_sizes`` instead of
    ``sizes``: one list of item sizes per part, ``part_sizes[s][i]`` being item ``i``'s size
    in part ``s`` (e.g. fixed bytes plus per-part in-flight copies of scaled bytes:
    ``[[f + m[s] * a for f, a in zip(fixed, scaled)] for s in range(num_parts)]``). The
    split stays min-max optimal among the splits that meet the capacities.

    Every part holds at least one item when there are at least as many items as parts. With
    fewer items than parts the result is :func:`partition_uniform`'s (trailing parts empty),
    as in DeepSpeed; capacities are then checked against that layout.

    Ties: among all optimal splits (bottleneck ``B``) one is chosen deterministically, so
    that the parts lighter than the bottleneck come out even rather than front-loaded:

    1. Boundaries are placed left to right. Boundary ``s`` goes, among the positions the
       part before it can reach under ``B`` and from which the rest can still be split
       under ``B``, to the one whose cost so far is nearest that part's fair share of the
       remaining cost (``1 / parts left``, or its speed's share of the remaining speed);
       then nearest its fair share of the remaining item count (runs of zero weights);
       then the later position.
    2. Each pair of neighbouring parts is then rebalanced in turn: their common boundary
       moves to minimise the larger of their two times, then the difference of the times,
       then the distance from the middle by count, then to the later position, within what
       both parts hold under ``B``. Sweeps repeat until nothing moves, at most
       ``num_parts`` times. Neither step can raise the bottleneck.

    Exactness: int weights are summed exactly. Float weights are compared through prefix
    sums (``itertools.accumulate``); the result is optimal exactly as those sums measure a
    part, i.e. up to the rounding of the prefix sums themselves. Mixed ints and floats, and
    any weights together with ``speeds``, are computed as floats.

    Cost: O(num_parts * log(len(weights))) per probe of a candidate bottleneck, about 10
    probes; 100,000 weights into 128 parts take about 15 ms. A part that cannot hold many
    items alone (a tiny capacity, a very slow speed) widens each probe to O(len(weights))
    in the worst case.

    Raises:
        TypeError: a weight, speed, capacity or size is not a real number, or is a bool.
        ValueError: ``num_parts < 1``; negative or non-finite weights or sizes; speeds or
            capacities not positive or not one per part; ``sizes`` or ``part_sizes``
            without ``capacities``, both given, or not one per item (and part); or
            capacities that no split can meet: a :class:`CapacityError` whose message says
            which item or part needs how much, and whose attributes give the split closest
            to fitting and the least raise of every capacity that lets a split fit.

    >>> partition_balanced([4, 1, 1, 1, 1, 4], 3)
    [0, 1, 5, 6]
    >>> partition_balanced([1] * 12, 3, speeds=[1, 2, 1])
    [0, 3, 9, 12]
    >>> partition_balanced([1] * 6, 2, capacities=[9, 9], part_sizes=[[3] * 6, [1] * 6])
    [0, 3, 6]
    """
    parts = count(num_parts, name="num_parts", minimum=1)
    costs = non_negative_values(weights, name="weights")
    constraints = checked_constraints(
        speeds,
        capacities,
        sizes,
        num_parts=parts,
        num_items=len(costs),
        words=ITEMS,
        items_counted=f"weights has {len(costs)}",
        part_sizes=part_sizes,
    )
    return balanced_boundaries(costs, parts, constraints, ITEMS)


def balanced_boundaries(
    costs: list[Real], num_parts: int, constraints: Constraints, words: Vocabulary
) -> list[int]:
    """:func:`partition_balanced` for inputs its edge (or ``plan_partition``'s) has checked;
    messages about capacities speak ``words``."""
    num_items = len(costs)
    capacities = constraints.capacities
    part_sizes = constraints.sizes_by_part(costs, num_parts)
    if num_items < num_parts:
        boundaries = partition_uniform(num_items, num_parts)
        if capacities is not None:
            item, part = words.item, words.part
            require_layout_fits(
                boundaries,
                part_sizes,
                capacities,
                words=words,
                why=(
                    f"with fewer {item}s ({num_items}) than {part}s ({num_parts}) {part} s holds "
                    f"{item} s alone; reorder the capacities or use at most {num_items} {part}s"
                ),
            )
        return boundaries

    exact = constraints.speeds is None and all_ints(costs)
    model = SegmentModel(
        costs if exact else [float(cost) for cost in costs],
        num_parts,
        exact=exact,
        speeds=constraints.speeds,
        capacities=capacities,
        part_sizes=part_sizes,
    )
    require_capacities_plausible(model, words)
    bottleneck = _optimal_bottleneck(model, words)
    boundaries = _place_boundaries(model, bottleneck)
    _relax_neighbours(model, bottleneck, boundaries)
    return boundaries


def _optimal_bottleneck(model: SegmentModel, words: Vocabulary) -> Real:
    """The smallest bottleneck for which a split exists (see the module note)."""
    n, p = model.num_items, model.num_stages
    total = model.prefix[n]
    rank: Callable[[Real], int]
    at: Callable[[int], Real]
    if model.exact:
        rank, at = _int_rank, _int_at
        lower: Real = max(model.max_item_cost, -(-int(total) // p))
        slack: Real = model.max_item_cost
        ceiling: Real = total
    else:
        rank, at = _double_rank, _double_at
        speeds = model.speeds or [1.0] * p
        # Sound lower bounds: the heaviest item runs somewhere, at best on the fastest stage,
        # and some stage carries at least its speed's share of the total. The margins cover
        # the rounding of the prefix sums and underflow in dividing by a speed, so the bound
        # never exceeds the true optimum.
        heaviest = model.max_item_cost / max(speeds)
        average = total / math.fsum(speeds) * (1.0 - (p + 8) * 2.0**-52) - 1e-323
        lower = max(heaviest, average, 0.0)
        slack = heaviest
        ceiling = total / min(speeds)

    probes = 0
    infeasible = rank(lower) - 1  # below a sound lower bound
    feasible: int | None = None

    def probe(bound_rank: int) -> None:
        """Move ``feasible`` down to what a feasible split achieves, or ``infeasible`` up."""
        nonlocal probes, infeasible, feasible
        probes += 1
        bound = at(bound_rank)
        known = feasible
        # Prune starts that could not finish under the best bottleneck known to work (or,
        # before there is one, under this bound itself; see SegmentModel.sweep_forward).
        sweep = model.sweep_forward(bound, prune_above=bound if known is None else at(known))
        if sweep.feasible:
            reached = rank(model.path_bottleneck(model.latest_boundaries(sweep.reach)))
            if reached > bound_rank:  # would stall the search; only a bug can cause it
                raise RuntimeError(
                    f"internal error in partition_balanced: a split found for bottleneck "
                    f"{bound!r} reaches {at(reached)!r}; please report this"
                )
            feasible = reached
        elif known is None or sweep.next_change == math.inf:
            # Pruned at this very bound, the sweep says nothing about larger ones.
            infeasible = max(infeasible, bound_rank)
        else:
            # Unchanged below next_change, so infeasible up to just below it.
            infeasible = min(max(bound_rank, rank(sweep.next_change) - 1), known - 1)

    # Upwards from the lower bound in doubling steps until some bound works; then bisect.
    guess, step = lower, slack if slack > 0 else 1
    while feasible is None and rank(guess) < rank(ceiling):
        if rank(guess) > infeasible:
            probe(rank(guess))
        guess, step = lower + step, 2 * step
    if feasible is None:
        probe(rank(ceiling))  # every run's cost fits under it: only capacities can fail
        if feasible is None:
            explain_capacities(model, words)
            raise RuntimeError(
                "internal error in partition_balanced: capacities fit no split, yet the "
                "explanation found one; please report this"
            )
    while feasible - infeasible > 1:
        probe((infeasible + feasible) // 2)
    bottleneck = at(feasible)
    logger.debug(
        "optimal bottleneck %r for %d items in %d parts after %d probes", bottleneck, n, p, probes
    )
    return bottleneck


def _place_boundaries(model: SegmentModel, bottleneck: Real) -> list[int]:
    """Step 1 of the tie-breaking rule: boundaries left to right, each near its even share."""
    p = model.num_stages
    starts = model.sweep_backward(bottleneck)
    speeds = model.speeds
    speed_left = list(accumulate(reversed(speeds)))[::-1] if speeds is not None else None
    boundaries = [0]
    for stage in range(1, p):
        # The share of what is left that the stage being closed should take.
        share = (
            speeds[stage - 1] / speed_left[stage - 1]
            if speeds is not None and speed_left is not None
            else None
        )
        boundaries.append(
            _next_boundary(model, bottleneck, stage, boundaries[-1], starts[stage], share)
        )
    boundaries.append(model.num_items)
    return boundaries


def _next_boundary(
    model: SegmentModel,
    bottleneck: Real,
    stage: int,
    previous: int,
    starts: Intervals,
    share: float | None,
) -> int:
    """Where stage ``stage`` begins, given where ``stage - 1`` began (``previous``).

    Candidates: positions the previous stage can reach under the bottleneck from which the
    remaining stages can still finish (``starts``). Preferred: prefix cost nearest the
    previous stage's share of the remaining cost, then nearest its share of the remaining
    count, then the later position.
    """
    n, p = model.num_items, model.num_stages
    prefix = model.prefix
    window_first = previous + 1
    window_last = model.furthest_end(stage - 1, previous, bottleneck)
    stages_left = p - stage + 1  # the stage being closed and every one after it

    cost_gap: Callable[[int], Real]
    nearest: Callable[[int, int], int]
    if model.exact:
        # Compare (cost taken) * stages_left with the remaining cost: exact integers.
        base = int(prefix[previous])
        remaining = int(prefix[n]) - base

        def cost_gap(end: int) -> Real:
            return abs((int(prefix[end]) - base) * stages_left - remaining)

        def nearest(first: int, last: int) -> int:
            return bisect_left(
                prefix, remaining, first, last + 1, key=lambda v: (int(v) - base) * stages_left
            )

    else:
        target = prefix[previous] + (prefix[n] - prefix[previous]) * (
            share if share is not None else 1.0 / stages_left
        )

        def cost_gap(end: int) -> Real:
            return abs(prefix[end] - target)

        def nearest(first: int, last: int) -> int:
            return bisect_left(prefix, target, first, last + 1)

    even = previous + (n - previous) // stages_left
    best: tuple[Real, int, int] | None = None
    for first, last in starts:
        first, last = max(first, window_first), min(last, window_last)
        if first > last:
            continue
        index = nearest(first, last)
        for candidate in (index - 1, index):
            if not first <= candidate <= last:
                continue
            for end in _run_positions_near(prefix, candidate, first, last, even):
                count_gap = abs((end - previous) * stages_left - (n - previous))
                key = (cost_gap(end), count_gap, -end)
                if best is None or key < best:
                    best = key
    if best is None:
        raise RuntimeError(
            f"internal error in partition_balanced: no position for boundary {stage} after "
            f"{previous} at bottleneck {bottleneck!r}; please report this"
        )
    return -best[2]


def _relax_neighbours(model: SegmentModel, bottleneck: Real, boundaries: list[int]) -> None:
    """Step 2 of the tie-breaking rule: balance each pair of neighbouring stages, in place.

    Moving the boundary between stages ``s`` and ``s + 1`` (within what both stages fit
    under ``bottleneck``) to minimise the larger of their two times never raises the
    bottleneck. Sweeps left to right until a sweep moves nothing, at most ``num_stages``
    sweeps.
    """
    p = model.num_stages
    for _ in range(p):
        moved = False
        for stage in range(p - 1):
            cut = _balanced_cut(model, bottleneck, stage, boundaries[stage], boundaries[stage + 2])
            if cut is not None and cut != boundaries[stage + 1]:
                boundaries[stage + 1] = cut
                moved = True
        if not moved:
            return


def _balanced_cut(
    model: SegmentModel, bottleneck: Real, stage: int, start: int, end: int
) -> int | None:
    """Best boundary between stages ``stage`` and ``stage + 1`` that jointly hold ``[start,
    end)``: smallest larger time, then smallest difference of times, then nearest the middle
    by count, then the later position. None when there is no choice."""
    first = max(start + 1, model.earliest_start(stage + 1, end, bottleneck))
    last = min(end - 1, model.furthest_end(stage, start, bottleneck))
    if first >= last:
        return None

    def times(cut: int) -> tuple[Real, Real]:
        return model.stage_time(stage, start, cut), model.stage_time(stage + 1, cut, end)

    def left_heavier(cut: int) -> bool:
        left, right = times(cut)
        return left >= right

    crossing = first + bisect_left(range(first, last + 1), True, key=left_heavier)
    best: tuple[Real, Real, int, int] | None = None
    for candidate in (crossing - 1, crossing):
        if not first <= candidate <= last:
            continue
        for cut in _run_positions_near(model.prefix, candidate, first, last, (start + end) // 2):
            left, right = times(cut)
            key = (max(left, right), abs(left - right), abs(2 * cut - start - end), -cut)
            if best is None or key < best:
                best = key
    return None if best is None else -best[3]


def _run_positions_near(
    prefix: list[Real], position: int, first: int, last: int, aim: int
) -> tuple[int, int]:
    """The two positions nearest ``aim``, within ``[first, last]``, that share ``position``'s
    prefix cost (a run of zero-cost items makes all of them equally costly)."""
    value = prefix[position]
    run_first = bisect_left(prefix, value, first, last + 1)
    run_last = bisect_right(prefix, value, first, last + 1) - 1
    return (min(max(aim, run_first), run_last), min(max(aim + 1, run_first), run_last))
