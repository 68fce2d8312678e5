"""Sizes that depend on the part (``part_sizes``): optimal, exactly explained, like ``sizes``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# pytest puts this folder on sys.path (see test_pipepartition_balanced.py).
from pipepartition_reference import (
    all_splits,
    bottleneck,
    least_common_raise,
    part_loads,
)

from pipepartition import CapacityError, partition_balanced, plan_partition

parts = st.integers(1, 4)


def affine_sizes(fixed: list[int], scaled: list[int], multipliers: list[int]) -> list[list[int]]:
    """Fixed bytes plus ``multipliers[s]`` copies of the scaled bytes: memory in flight."""
    return [[f + m * a for f, a in zip(fixed, scaled, strict=True)] for m in multipliers]


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[int], list[list[int]], list[int]]:
    num_parts = draw(parts)
    num_items = draw(st.integers(num_parts, 8))
    items = st.lists(st.integers(0, 9), min_size=num_items, max_size=num_items)
    weights = draw(items)
    multipliers = draw(st.lists(st.integers(0, 4), min_size=num_parts, max_size=num_parts))
    sizes = draw(
        st.one_of(
            st.builds(affine_sizes, items, items, st.just(multipliers)),
            st.lists(items, min_size=num_parts, max_size=num_parts),
        )
    )
    capacities = draw(st.lists(st.integers(1, 60), min_size=num_parts, max_size=num_parts))
    return weights, sizes, capacities


@settings(max_examples=500, deadline=None)
@given(problems())
def test_the_split_is_the_fastest_that_fits_or_the_error_gives_the_exact_shortfall(
    problem: tuple[list[int], list[list[int]], list[int]],
) -> None:
    weights, sizes, capacities = problem
    num_parts, num_items = len(capacities), len(weights)
    splits = list(all_splits(num_items, num_parts))
    fitting = [
        split
        for split in splits
        if all(load <= cap for load, cap in zip(part_loads(sizes, split), capacities, strict=True))
    ]
    if fitting:
        boundaries = partition_balanced(weights, num_parts, capacities=capacities, part_sizes=sizes)
        assert boundaries in fitting
        assert bottleneck(weights, boundaries) == min(bottleneck(weights, s) for s in fitting)
        return
    with pytest.raises(CapacityError) as raised:
        partition_balanced(weights, num_parts, capacities=capacities, part_sizes=sizes)
    error = raised.value
    shortfall = least_common_raise(sizes, capacities, num_items)
    assert error.shortfall == shortfall > 0
    # The closest split really is that short, on the part named, and no part more.
    overflows = [
        load - cap
        for load, cap in zip(part_loads(sizes, error.boundaries), capacities, strict=True)
    ]
    assert max(overflows) == overflows[error.part] == shortfall
    if num_parts > 1:  # with one part the message is the plain one of ``sizes``
        assert f"every capacity must grow by at least {shortfall} " in str(error)


@settings(max_examples=200, deadline=None)
@given(st.data(), parts)
def test_one_list_per_part_that_are_all_equal_is_the_same_as_sizes(
    data: st.DataObject, num_parts: int
) -> None:
    num_items = data.draw(st.integers(num_parts, 9))
    items = st.lists(st.integers(0, 9), min_size=num_items, max_size=num_items)
    weights, sizes = data.draw(items), data.draw(items)
    capacities = data.draw(st.lists(st.integers(1, 30), min_size=num_parts, max_size=num_parts))
    try:
        expected: object = partition_balanced(
            weights, num_parts, capacities=capacities, sizes=sizes
        )
    except CapacityError as error:
        expected = ("error", error.shortfall)
    try:
        got: object = partition_balanced(
            weights, num_parts, capacities=capacities, part_sizes=[list(sizes)] * num_parts
        )
    except CapacityError as error:
        got = ("error", error.shortfall)
    assert got == expected


def test_a_part_holding_more_copies_takes_fewer_items() -> None:
    # Stage 0 holds 4 micro-batches in flight, stage 1 one (1F1B with two stages and m=4 is
    # 2 and 1; here the first stage holds more): equal layers move to the later stage.
    sizes = affine_sizes([1] * 6, [2] * 6, [4, 1])
    assert partition_balanced([1] * 6, 2, capacities=[20, 20], part_sizes=sizes) == [0, 2, 6]
    assert partition_balanced([1] * 6, 2) == [0, 3, 6]


def test_the_message_names_the_closest_split_and_how_much_each_short_part_needs() -> None:
    sizes = affine_sizes([1] * 4, [2] * 4, [4, 1])
    with pytest.raises(
        CapacityError,
        match=r"no split of the 4 layers into 2 stages fits the capacities \[9, 8\]; the closest, "
        r"boundaries \[0, 1, 4\], is short on stage 1: stage 1 holds layers \[1, 4\) that need "
        r"9, 1 more than its capacity 8; every capacity must grow by at least 1 for any split to "
        r"fit, or use more stages$",
    ) as raised:
        plan_partition(
            "parameters",
            2,
            names=["a"] * 4,
            parameters=[1] * 4,
            capacities=[9, 8],
            part_sizes=sizes,
        )
    assert (raised.value.part, raised.value.shortfall) == (1, 1)


def test_a_layout_chosen_without_capacities_is_checked_by_its_own_stages_sizes() -> None:
    sizes = affine_sizes([1] * 4, [2] * 4, [4, 1])
    with pytest.raises(
        CapacityError, match=r"stage 0 holds layers \[0, 2\) that need 18"
    ) as raised:
        plan_partition("uniform", 2, names=["a"] * 4, capacities=[10, 10], part_sizes=sizes)
    assert (raised.value.part, raised.value.shortfall, raised.value.boundaries) == (0, 8, (0, 2, 4))


def test_float_sizes_give_the_smallest_double_that_fits() -> None:
    sizes = [[0.5, 0.25, 0.25], [0.1, 0.1, 0.1]]
    with pytest.raises(CapacityError) as raised:
        partition_balanced([1, 1, 1], 2, capacities=[0.4, 0.1], part_sizes=sizes)
    # Closest: part 0 takes item 0 (0.5 against 0.4), part 1 the rest (0.2 against 0.1).
    assert raised.value.boundaries == (0, 1, 3)
    assert raised.value.shortfall == pytest.approx(0.1)
    raised_caps = [0.4 + raised.value.shortfall, 0.1 + raised.value.shortfall]
    assert partition_balanced([1, 1, 1], 2, capacities=raised_caps, part_sizes=sizes)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        pytest.param(
            {"capacities": [9, 9], "sizes": [1] * 3, "part_sizes": [[1] * 3] * 2},
            ValueError,
            "pass sizes .* or part_sizes .*, not both",
            id="both",
        ),
        pytest.param(
            {"part_sizes": [[1] * 3] * 2},
            ValueError,
            "part_sizes only matter together with capacities",
            id="without capacities",
        ),
        pytest.param(
            {"capacities": [9, 9], "part_sizes": [[1] * 3]},
            ValueError,
            "part_sizes has 1 entry but there are 2 parts; pass one list of item sizes per part",
            id="one list too few",
        ),
        pytest.param(
            {"capacities": [9, 9], "part_sizes": [[1] * 3, [1] * 2]},
            ValueError,
            r"part_sizes\[1\] has 2 entries but weights has 3; pass one size per item",
            id="a list too short",
        ),
        pytest.param(
            {"capacities": [9, 9], "part_sizes": [[1] * 3, [1, -1, 1]]},
            ValueError,
            r"part_sizes\[1\]\[1\] is -1",
            id="negative",
        ),
        pytest.param(
            {"capacities": [9, 9], "part_sizes": "abc"},
            TypeError,
            "part_sizes must be a sequence of sequences",
            id="a string",
        ),
    ],
)
def test_part_sizes_mistakes_are_named(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        partition_balanced([1, 2, 3], 2, **arguments)  # type: ignore[arg-type]
