"""partition_uniform: DeepSpeed's layout by count, including its own regression cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipepartition import partition_uniform


def test_extra_items_go_to_the_first_parts() -> None:
    assert partition_uniform(10, 4) == [0, 3, 6, 8, 10]


def test_fewer_items_than_parts_leaves_the_trailing_parts_empty() -> None:
    assert partition_uniform(2, 4) == [0, 1, 2, 2, 2]


def test_no_items_gives_all_parts_empty() -> None:
    assert partition_uniform(0, 3) == [0, 0, 0, 0]


# Ported from DeepSpeed's tests/unit/runtime/utils/test_partition.py (test_short_partition_uniform,
# test_easy_balance_uniform): a valid partition for 2 items in 4 parts, and 8 items in 4 parts
# of exactly 2 each.
def test_deepspeed_short_partition_is_valid() -> None:
    parts = partition_uniform(2, 4)
    assert len(parts) == 5
    assert parts[0] == 0
    assert parts[-1] == 2
    assert parts == sorted(parts)


def test_deepspeed_easy_balance_gives_two_each() -> None:
    parts = partition_uniform(8, 4)
    assert [parts[i + 1] - parts[i] for i in range(4)] == [2, 2, 2, 2]


@given(st.integers(0, 300), st.integers(1, 40))
def test_part_sizes_differ_by_at_most_one_and_larger_parts_come_first(
    num_items: int, num_parts: int
) -> None:
    parts = partition_uniform(num_items, num_parts)
    sizes = [parts[i + 1] - parts[i] for i in range(num_parts)]
    assert parts[0] == 0
    assert parts[-1] == num_items
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    assert all(type(boundary) is int for boundary in parts)


@pytest.mark.parametrize(
    ("num_items", "num_parts", "message"),
    [
        (-1, 2, "num_items is -1"),
        (4, 0, "num_parts is 0"),
    ],
)
def test_bad_counts_are_rejected_by_name(num_items: int, num_parts: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition_uniform(num_items, num_parts)


def test_non_int_counts_are_type_errors() -> None:
    with pytest.raises(TypeError, match="num_parts must be an int"):
        partition_uniform(4, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_items must be an int"):
        partition_uniform(True, 2)
