"""The rules for the sequences partitioning works on, each written once, with one message.

[Note: validate once at the edge] Every public entry point (``partition_balanced``,
``plan_partition``, ``PartitionPlan``, the method objects) checks its arguments with these
functions as it receives them and passes plain checked lists and tuples inward; the code
behind the edge trusts them. A rule that two entry points share is one function here, so
the same mistake gets the same message whichever way it arrives: the offending value, why
it is wrong, and how to fix it. A wrong type raises TypeError, a wrong value ValueError,
both naming the argument. Messages end without a period.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from pipepartition._numbers import (
    Real,
    entries,
    integer,
    non_negative_values,
    plural,
    positive_values,
)
from pipepartition._vocabulary import Vocabulary


def require_length(
    name: str,
    actual: int,
    expected: int,
    *,
    per: str,
    counted: str | None = None,
    unit: str = "value",
    has: str | None = None,
) -> None:
    """Raise ValueError unless a per-``per`` sequence has ``expected`` entries.

    ``counted`` says where ``expected`` comes from (default ``there are 3 stages``); ``has``
    how the sequence's own length is spelt (default ``2 entries``).
    """
    if actual == expected:
        return
    if counted is None:
        counted = f"there are {plural(expected, per)}"
    raise ValueError(
        f"{name} has {has if has is not None else entries(actual)} but {counted}; pass one "
        f"{unit} per {per}"
    )


def checked_strings(values: object, *, name: str, per: str, hint: str) -> tuple[str, ...]:
    """One str per ``per`` as a tuple; TypeError names ``values`` or the first non-str."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a sequence of str (one per {per}), got {type(values).__name__}"
        )
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(
                f"{name}[{index}] is {value!r} of type {type(value).__name__}; pass one str per "
                f"{per}, {hint}"
            )
    return tuple(values)


def checked_names(names: object) -> tuple[str, ...]:
    """Per-layer names (how many is the caller's rule)."""
    return checked_strings(names, name="names", per="layer", hint="e.g. its class name")


def checked_boundaries(values: object) -> tuple[int, ...]:
    """Stage boundaries as plain ints: at least two, starting at 0, never decreasing.

    Whether they fit a number of layers or stages is for the caller (:func:`require_coverage`,
    :func:`require_boundary_count`): a :class:`Boundaries` method does not know them yet.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(
            f"boundaries must be a sequence of ints, got {type(values).__name__}: {values!r}"
        )
    bounds = tuple(
        integer(value, name=f"boundaries[{index}]") for index, value in enumerate(values)
    )
    problem = _shape_problem(bounds)
    if problem is not None:
        raise ValueError(
            f"boundaries {show_boundaries(bounds)} are not stage boundaries: {problem}"
        )
    return bounds


def _shape_problem(bounds: tuple[int, ...]) -> str | None:
    if len(bounds) < 2:
        return (
            "they describe no stage; pass num_stages + 1 positions, e.g. [0, 12, 24] for two "
            "stages of 12 layers"
        )
    if bounds[0] != 0:
        return f"they start at {bounds[0]}; the first must be 0 so that layer 0 belongs to stage 0"
    for stage in range(len(bounds) - 1):
        if bounds[stage + 1] < bounds[stage]:
            return (
                f"they decrease at stage {stage} ({bounds[stage]} then {bounds[stage + 1]}); "
                "they must be non-decreasing so each layer is placed once, in order"
            )
    return None


def require_coverage(bounds: Sequence[int], num_layers: int, *, counted: str) -> None:
    """Raise ValueError, naming the stray layers, unless ``bounds`` end at ``num_layers``;
    ``counted`` says where the layer count comes from, e.g. ``"there are 3 layers"``."""
    end = bounds[-1]
    if end == num_layers:
        return
    if end < num_layers:
        problem = f"leaving layers [{end}, {num_layers}) without a stage"
    else:
        problem = f"placing layers [{num_layers}, {end}) that do not exist in the last stages"
    raise ValueError(
        f"boundaries {show_boundaries(bounds)} end at {end} but {counted}, {problem}; the last "
        f"boundary must be {num_layers}"
    )


def require_boundary_count(bounds: Sequence[int], num_stages: int) -> None:
    """Raise ValueError unless ``bounds`` describe exactly ``num_stages`` stages."""
    if len(bounds) != num_stages + 1:
        raise ValueError(
            f"boundaries {show_boundaries(bounds)} describe {len(bounds) - 1} stages but "
            f"num_stages is {num_stages}; pass {num_stages + 1} positions"
        )


def require_no_empty_stage(bounds: Sequence[int]) -> None:
    """Raise ValueError if a stage is empty although there are enough layers for all."""
    num_layers, num_stages = bounds[-1], len(bounds) - 1
    if num_layers < num_stages:
        return
    for stage in range(num_stages):
        if bounds[stage] == bounds[stage + 1]:
            raise ValueError(
                f"boundaries {show_boundaries(bounds)} leave stage {stage} empty; with "
                f"{num_layers} layers for {num_stages} stages every stage needs at least one "
                "layer, so move a boundary"
            )


def show_boundaries(bounds: Sequence[int]) -> str:
    """``[0, 3, 6]``, or ``[0, ..., 96]`` when there are too many to read."""
    return str(list(bounds)) if len(bounds) <= 12 else f"[{bounds[0]}, ..., {bounds[-1]}]"


def require_capacities_for_sizes(sizes: object, capacities: object, *, words: Vocabulary) -> None:
    """Raise ValueError for ``sizes`` without ``capacities``: alone they would be ignored."""
    if sizes is not None and capacities is None:
        raise ValueError(
            "sizes only matter together with capacities; pass capacities=[...] with one "
            f"limit per {words.part}, or drop sizes"
        )


class Constraints(NamedTuple):
    """Checked per-part speeds and capacities and per-item sizes, each None if not given."""

    speeds: list[Real] | None
    capacities: list[Real] | None
    sizes: list[Real] | None
    """None means the items' costs are their sizes (unless ``part_sizes`` is given)."""
    part_sizes: list[list[Real]] | None = None
    """``part_sizes[s][i]``: item ``i``'s size when part ``s`` holds it; None: ``sizes``."""

    def sizes_by_part(self, costs: list[Real], num_parts: int) -> list[list[Real]]:
        """One list of item sizes per part; parts that share sizes share one list object."""
        if self.part_sizes is not None:
            return self.part_sizes
        shared = costs if self.sizes is None else self.sizes
        return [shared] * num_parts


def checked_constraints(
    speeds: Sequence[float] | None,
    capacities: Sequence[float] | None,
    sizes: Sequence[float] | None,
    *,
    num_parts: int,
    num_items: int,
    words: Vocabulary,
    items_counted: str,
    part_sizes: Sequence[Sequence[float]] | None = None,
) -> Constraints:
    """The speeds, capacities and sizes of ``partition_balanced`` and ``plan_partition``.

    Speeds are finite and > 0, capacities > 0 (``math.inf`` allowed), one of each per part;
    sizes are finite, >= 0, one per item (``items_counted`` says where that count comes
    from), and only allowed together with capacities. ``part_sizes`` is one such list per
    part, instead of ``sizes``.
    """
    speed_list = None
    if speeds is not None:
        speed_list = positive_values(speeds, name="speeds", allow_inf=False)
        require_length("speeds", len(speed_list), num_parts, per=words.part)
    capacity_list = None
    if capacities is not None:
        capacity_list = positive_values(capacities, name="capacities", allow_inf=True)
        require_length("capacities", len(capacity_list), num_parts, per=words.part)
    require_capacities_for_sizes(sizes, capacities, words=words)
    size_list = None
    if sizes is not None:
        size_list = non_negative_values(sizes, name="sizes")
        require_length(
            "sizes", len(size_list), num_items, per=words.item, counted=items_counted, unit="size"
        )
    part_size_lists = None
    if part_sizes is not None:
        part_size_lists = _checked_part_sizes(
            part_sizes, sizes, capacities, num_parts, num_items, words, items_counted
        )
    return Constraints(speed_list, capacity_list, size_list, part_size_lists)


def _checked_part_sizes(
    part_sizes: object,
    sizes: object,
    capacities: object,
    num_parts: int,
    num_items: int,
    words: Vocabulary,
    items_counted: str,
) -> list[list[Real]]:
    if sizes is not None:
        raise ValueError(
            f"pass sizes (one per {words.item}, the same for every {words.part}) or part_sizes "
            f"(one list per {words.part}), not both"
        )
    if capacities is None:
        raise ValueError(
            "part_sizes only matter together with capacities; pass capacities=[...] with one "
            f"limit per {words.part}, or drop part_sizes"
        )
    if isinstance(part_sizes, str | bytes) or not isinstance(part_sizes, Sequence):
        raise TypeError(
            f"part_sizes must be a sequence of sequences (one list of {words.item} sizes per "
            f"{words.part}), got {type(part_sizes).__name__}"
        )
    require_length(
        "part_sizes", len(part_sizes), num_parts, per=words.part, unit=f"list of {words.item} sizes"
    )
    checked: list[list[Real]] = []
    for part, values in enumerate(part_sizes):
        name = f"part_sizes[{part}]"
        part_list = non_negative_values(values, name=name)
        require_length(
            name, len(part_list), num_items, per=words.item, counted=items_counted, unit="size"
        )
        checked.append(part_list)
    return checked


def checked_index(value: object, *, name: str, size: int, what: str) -> int:
    """``value`` as an int in ``0..size - 1``: a layer or stage index into a plan.

    ``name`` is the argument (``layer``), ``what`` the kind of index the fix asks for
    (``global layer index``).
    """
    index = integer(value, name=name)
    if size == 0:
        raise ValueError(f"{name} {index} does not exist: this plan has no {name}s")
    if not 0 <= index < size:
        raise ValueError(
            f"{name} {index} is outside this plan's {name}s 0..{size - 1}; pass a {what} in "
            "that range"
        )
    return index
