"""partition_balanced: optimal against brute force, constrained, deterministic, well explained."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# pytest puts this folder on sys.path; mypy sees it as the namespace package
# packages.pipepartition.tests and cannot resolve the plain name.
from pipepartition_reference import (
    all_splits,
    bottleneck,
    brute_force_optimum,
    fits,
    parts_needed,
)

from pipepartition import partition_balanced, partition_uniform

Number = int | float


def assert_valid(boundaries: Sequence[int], num_items: int, num_parts: int) -> None:
    assert len(boundaries) == num_parts + 1
    assert boundaries[0] == 0
    assert boundaries[-1] == num_items
    assert all(type(boundary) is int for boundary in boundaries)
    if num_items >= num_parts:
        assert all(boundaries[s] < boundaries[s + 1] for s in range(num_parts)), boundaries
    else:
        assert list(boundaries) == partition_uniform(num_items, num_parts)


def part_sums(weights: Sequence[Number], boundaries: Sequence[int]) -> list[Number]:
    return [sum(weights[boundaries[s] : boundaries[s + 1]]) for s in range(len(boundaries) - 1)]


# -- strategies ---------------------------------------------------------------------------

int_weights = st.lists(st.integers(0, 20), max_size=9)
float_weights = st.lists(
    st.one_of(
        st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
        st.floats(0, 1e300, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, 0.1, 0.2, 0.3, 1e-300, 5e-324, 1e16]),
    ),
    max_size=9,
)
parts = st.integers(1, 5)


# -- optimality and shape -----------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.one_of(int_weights, float_weights), parts)
def test_bottleneck_equals_the_brute_force_optimum(weights: list[Number], num_parts: int) -> None:
    boundaries = partition_balanced(weights, num_parts)
    assert_valid(boundaries, len(weights), num_parts)
    if len(weights) >= num_parts:
        assert bottleneck(weights, boundaries) == brute_force_optimum(weights, num_parts)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(int_weights, float_weights),
    st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 0.3]), min_size=1, max_size=5),
)
def test_with_speeds_the_slowest_relative_part_is_optimal(
    weights: list[Number], speeds: list[float]
) -> None:
    num_parts = len(speeds)
    boundaries = partition_balanced(weights, num_parts, speeds=speeds)
    assert_valid(boundaries, len(weights), num_parts)
    if len(weights) >= num_parts:
        expected = brute_force_optimum(weights, num_parts, speeds=speeds)
        assert bottleneck(weights, boundaries, speeds) == expected


@settings(max_examples=400, deadline=None)
@given(st.data(), parts)
def test_capacities_are_met_and_infeasible_exactly_when_no_split_fits(
    data: st.DataObject, num_parts: int
) -> None:
    num_items = data.draw(st.integers(num_parts, 9))
    weights = data.draw(st.lists(st.integers(0, 20), min_size=num_items, max_size=num_items))
    sizes = data.draw(st.lists(st.integers(0, 9), min_size=num_items, max_size=num_items))
    capacities = data.draw(st.lists(st.integers(1, 25), min_size=num_parts, max_size=num_parts))
    speeds = data.draw(
        st.none()
        | st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=num_parts, max_size=num_parts)
    )
    expected = brute_force_optimum(weights, num_parts, speeds, capacities, sizes)
    if expected is None:
        with pytest.raises(ValueError, match=r"capacit|part"):
            partition_balanced(
                weights, num_parts, speeds=speeds, capacities=capacities, sizes=sizes
            )
        return
    boundaries = partition_balanced(
        weights, num_parts, speeds=speeds, capacities=capacities, sizes=sizes
    )
    assert_valid(boundaries, num_items, num_parts)
    assert fits(sizes, capacities, boundaries)
    assert bottleneck(weights, boundaries, speeds) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([0.0, 5e-324, 1e-323, 1.5e-323, 2e-323, 2.2250738585072014e-308]),
        max_size=9,
    ),
    st.lists(st.sampled_from([0.25, 0.3, 1.0, 2.0, 2.5, 3.0]), min_size=1, max_size=5),
)
def test_subnormal_weights_stay_optimal_even_when_dividing_by_speeds_underflows(
    weights: list[float], speeds: list[float]
) -> None:
    num_parts = len(speeds)
    boundaries = partition_balanced(weights, num_parts, speeds=speeds)
    assert_valid(boundaries, len(weights), num_parts)
    if len(weights) >= num_parts:
        expected = brute_force_optimum(weights, num_parts, speeds=speeds)
        assert bottleneck(weights, boundaries, speeds) == expected


def test_underflowing_stage_times_regression() -> None:
    # 5e-324 / 2.0 rounds to 0.0: the optimum is 0 and a split must still be found.
    assert partition_balanced([5e-324, 0.0], 2, speeds=[2.0, 0.25]) == [0, 1, 2]


@given(st.one_of(int_weights, float_weights), parts)
def test_same_input_gives_the_same_boundaries(weights: list[Number], num_parts: int) -> None:
    first = partition_balanced(weights, num_parts)
    assert partition_balanced(list(weights), num_parts) == first
    assert partition_balanced(tuple(weights), num_parts) == first


def test_large_input_is_optimal_by_an_independent_check() -> None:
    rng = random.Random(3)
    weights = [rng.randint(1, 1000) for _ in range(5000)]
    boundaries = partition_balanced(weights, 24)
    assert_valid(boundaries, len(weights), 24)
    found = int(bottleneck(weights, boundaries))
    assert parts_needed(weights, found) <= 24
    assert parts_needed(weights, found - 1) > 24


# -- regression cases -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "num_parts", "spread"),
    [
        # DeepSpeed, tests/unit/utils/test_partition_balanced.py: max - min of the part sums.
        ([1, 2, 1], 4, 2),
        ([1, 1, 1, 1], 4, 0),
        ([1, 1, 1, 1, 1], 4, 1),
        ([1, 1, 1, 1, 0, 1], 4, 1),
    ],
)
def test_deepspeed_spread_cases(weights: list[int], num_parts: int, spread: int) -> None:
    sums = part_sums(weights, partition_balanced(weights, num_parts))
    assert max(sums) - min(sums) == spread


@pytest.mark.parametrize(
    ("weights", "num_parts", "expected"),
    [
        # DeepSpeed, tests/unit/runtime/utils/test_partition.py.
        ([0, 1, 2, 3, 3, 3], 4, [0, 3, 4, 5, 6]),
        ([0.0, 1.1, 1.9, 3.0, 3.0, 3.0], 4, [0, 3, 4, 5, 6]),
        ([0.0, 1.1, 30, 3.0], 3, [0, 2, 3, 4]),
        # DeepSpeed skips this one ("variance-minimizing partitioning returns a different
        # result"); the min-max optimum is unique and we find it.
        ([0.0, 1.1, 1.9, 3.0, 30.0], 2, [0, 4, 5]),
        ([1] * 10, 1, [0, 10]),
        ([1, 1], 4, [0, 1, 2, 2, 2]),
    ],
)
def test_deepspeed_exact_cases(weights: list[Number], num_parts: int, expected: list[int]) -> None:
    assert partition_balanced(weights, num_parts) == expected


def test_deepspeed_easy_balance_gives_equal_parts() -> None:
    assert part_sums([1] * 8, partition_balanced([1] * 8, 4)) == [2, 2, 2, 2]


def test_deepspeed_bert_parameters_split_optimally() -> None:
    # Parameters per layer of a 24-layer, hidden-1024 transformer (DeepSpeed's test_balance_bert).
    weights = [52559872] + [12596224] * 24 + [0, 52559872]
    boundaries = partition_balanced(weights, 8)
    assert_valid(boundaries, len(weights), 8)
    # Embedding and head each alone can't be beaten; the 24 blocks spread 4 per middle stage.
    assert bottleneck(weights, boundaries) == 52559872
    assert part_sums(weights, boundaries)[1:-1] == [4 * 12596224] * 6


def test_min_max_beats_minimising_the_spread() -> None:
    # DeepSpeed's current partition_balanced minimises max - min of the part sums. For these
    # weights the only split with the smallest spread, [1 5 | 3 | 1 2 | 3] (sums 6 3 3 3,
    # spread 3), has a bottleneck of 6, while [1 | 5 | 3 1 | 2 3] (sums 1 5 4 5) runs at 5:
    # the pipeline's slowest stage sets its pace, so min-max is what throughput needs.
    weights = [1, 5, 3, 1, 2, 3]
    splits = list(all_splits(len(weights), 4))
    smallest_spread = min(max(part_sums(weights, s)) - min(part_sums(weights, s)) for s in splits)
    spread_optimal = [
        s
        for s in splits
        if max(part_sums(weights, s)) - min(part_sums(weights, s)) == smallest_spread
    ]
    assert spread_optimal == [[0, 2, 3, 5, 6]]
    assert bottleneck(weights, spread_optimal[0]) == 6
    assert bottleneck(weights, partition_balanced(weights, 4)) == 5


# -- tie-breaking ---------------------------------------------------------------------------


def test_parts_lighter_than_the_bottleneck_are_even_not_front_loaded() -> None:
    assert partition_balanced([10] + [1] * 8, 3) == [0, 1, 5, 9]
    assert partition_balanced([1] * 8 + [10], 3) == [0, 4, 8, 9]


def test_zero_weights_split_like_partition_uniform() -> None:
    assert partition_balanced([0] * 10, 3) == partition_uniform(10, 3)
    assert partition_balanced([0.0] * 7, 3) == partition_uniform(7, 3)


def test_equal_weights_split_like_partition_uniform() -> None:
    assert partition_balanced([5] * 10, 4) == partition_uniform(10, 4)


def test_faster_stage_gets_proportionally_more() -> None:
    boundaries = partition_balanced([1] * 12, 3, speeds=[1, 2, 1])
    assert part_sums([1] * 12, boundaries) == [3, 6, 3]


# -- inputs and messages -----------------------------------------------------------------------


def test_returns_plain_ints_for_numpy_like_scalars() -> None:
    class Integral(int):
        pass

    boundaries = partition_balanced([Integral(3), 1.5, 2], 2)
    assert all(type(boundary) is int for boundary in boundaries)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weights": [1, -2], "num_parts": 2}, ValueError, r"weights\[1\] is -2"),
        ({"weights": [1, float("nan")], "num_parts": 2}, ValueError, r"weights\[1\] is nan"),
        ({"weights": [float("inf")], "num_parts": 1}, ValueError, r"weights\[0\] is inf"),
        ({"weights": [1e308, 1e308], "num_parts": 1}, ValueError, "overflow"),
        ({"weights": [1, True], "num_parts": 2}, TypeError, r"weights\[1\] is True of type bool"),
        ({"weights": [1, "2"], "num_parts": 2}, TypeError, r"weights\[1\] is '2' of type str"),
        ({"weights": "12", "num_parts": 2}, TypeError, "weights must be a sequence"),
        ({"weights": [1, 2], "num_parts": 0}, ValueError, "num_parts is 0"),
        (
            {"weights": [1, 2], "num_parts": 2, "speeds": [1]},
            ValueError,
            "speeds has 1 entry but there are 2 parts",
        ),
        (
            {"weights": [1, 2], "num_parts": 2, "speeds": [1, 0]},
            ValueError,
            r"speeds\[1\] is 0; every value must be finite and > 0",
        ),
        (
            {"weights": [1, 2], "num_parts": 2, "capacities": [1, -1]},
            ValueError,
            r"capacities\[1\] is -1",
        ),
        (
            {"weights": [1, 2], "num_parts": 2, "sizes": [1, 1]},
            ValueError,
            "sizes only matter together with capacities",
        ),
        (
            {"weights": [1, 2], "num_parts": 2, "capacities": [9, 9], "sizes": [1]},
            ValueError,
            "sizes has 1 entry but weights has 2",
        ),
    ],
)
def test_bad_input_is_named_in_the_message(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        partition_balanced(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weights", "num_parts", "capacities", "message"),
    [
        pytest.param(
            [1, 2, 3e9, 1],
            2,
            [1e9, 2e9],
            r"item 2 alone needs 3,000,000,000 but the largest capacity is 2,000,000,000 "
            r"\(part 1\)",
            id="an item larger than every capacity",
        ),
        pytest.param(
            [5] * 10,
            2,
            [20, 20],
            r"need 50 in total but the 2 capacities \[20, 20\] sum to 40; add at least 10",
            id="more in total than all capacities",
        ),
        pytest.param(
            # Caps 10, 10, 10 with items of 6: two items never share a part, so three parts
            # hold three items; the message names the items left over and their size.
            [6, 6, 6, 6],
            3,
            [10, 10, 10],
            r"parts 0\.\.2 \(capacities \[10, 10, 10\]\) can hold at most items \[0, 3\) "
            r"of 4; the remaining items \[3, 4\) need 6 more",
            id="only a prefix fits",
        ),
        pytest.param(
            # Part 1 (capacity 1) must hold an item, but it can only start at item 1 or 2
            # (part 0 holds at most [1 5]), and both need 5.
            [1, 5, 5, 1],
            3,
            [6, 1, 10],
            r"part 1 \(capacity 1\) must hold at least one item, but every item it could "
            r"start with \(item 1\.\.2, .*the smallest needs 5",
            id="a part too small for any item it could start with",
        ),
    ],
)
def test_capacities_no_split_meets_are_explained(
    weights: list[Number], num_parts: int, capacities: list[Number], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        partition_balanced(weights, num_parts, capacities=capacities)
    # partition_balanced speaks DeepSpeed's items and parts, never plan_partition's words.
    assert "layer" not in str(caught.value)
    assert "stage" not in str(caught.value)


def test_fewer_items_than_parts_checks_capacities_against_the_uniform_layout() -> None:
    with pytest.raises(
        ValueError,
        match=r"part 1 holds items \[1, 2\) that need 2 but its capacity is 1; with fewer items "
        r"\(2\) than parts \(4\)",
    ):
        partition_balanced([1, 2], 4, capacities=[1, 1, 1, 1])
    assert partition_balanced([1, 2], 4, capacities=[1, 2, 1, 1]) == [0, 1, 2, 2, 2]


def test_infinite_capacity_means_unlimited() -> None:
    assert partition_balanced([3, 3, 3], 2, capacities=[float("inf"), 3]) == [0, 2, 3]
