"""The catalogue of user mistakes for pipepartition: each raises a typed error naming the fix.

One test per case, so a regression in any message or type fails CI (see the README's "What goes
wrong, and what you see").
"""

from __future__ import annotations

import pytest

from pipepartition import (
    Boundaries,
    Weights,
    parse_method,
    partition_balanced,
    partition_uniform,
    plan_partition,
)

NAMES = ["a", "b", "c"]


def test_misspelt_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown partition method 'paramters'; use 'uniform'"):
        parse_method("paramters")


def test_invalid_regex() -> None:
    with pytest.raises(ValueError, match=r"'type:\(' is not a valid regular expression"):
        parse_method("type:(")


def test_regex_method_without_a_pattern() -> None:
    with pytest.raises(ValueError, match=r"needs a pattern after the colon"):
        parse_method("type:")


def test_method_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"method must be a str or a method object, got int"):
        parse_method(5)  # type: ignore[arg-type]


def test_regex_matching_no_layer() -> None:
    with pytest.raises(ValueError, match=r"matches none of the 3 layer names"):
        plan_partition(parse_method("type:Foo"), 2, names=NAMES)


def test_zero_parts() -> None:
    with pytest.raises(ValueError, match=r"num_parts is 0; it must be an integer >= 1"):
        partition_uniform(3, 0)


def test_fractional_item_count() -> None:
    with pytest.raises(TypeError, match=r"num_items must be an int, got float"):
        partition_uniform(2.5, 2)  # type: ignore[arg-type]


def test_bool_stage_count() -> None:
    with pytest.raises(TypeError, match=r"num_stages must be an int, got bool"):
        plan_partition("uniform", True, names=NAMES)


def test_negative_weight() -> None:
    with pytest.raises(ValueError, match=r"weights\[2\] is -3; every value must be a finite"):
        partition_balanced([1, 2, -3], 2)


def test_nan_weight() -> None:
    with pytest.raises(ValueError, match=r"weights\[1\] is nan"):
        partition_balanced([1, float("nan")], 2)


def test_weights_given_as_a_string() -> None:
    with pytest.raises(TypeError, match=r"weights must be a sequence of numbers, got str"):
        partition_balanced("abc", 2)  # type: ignore[arg-type]


def test_decreasing_boundaries() -> None:
    with pytest.raises(ValueError, match=r"they decrease at stage 1"):
        Boundaries([0, 2, 1])


def test_boundaries_for_another_stage_count() -> None:
    with pytest.raises(ValueError, match=r"describe 2 stages but num_stages is 3; pass 4"):
        plan_partition(Boundaries([0, 1, 3]), 3, names=NAMES)


def test_one_weight_per_layer() -> None:
    with pytest.raises(ValueError, match=r"3 weights but there are 4 layers"):
        plan_partition(Weights([1, 2, 3]), 2, names=[*NAMES, "d"])


def test_a_layer_larger_than_every_capacity() -> None:
    with pytest.raises(ValueError, match=r"layer 0 alone needs 4 but the largest capacity is 1"):
        plan_partition(
            "parameters", 2, names=NAMES, parameters=[1, 2, 3], capacities=[1, 1], sizes=[4] * 3
        )


def test_zero_stage_speed() -> None:
    with pytest.raises(ValueError, match=r"speeds\[1\] is 0; every value must be finite and > 0"):
        plan_partition("parameters", 2, names=NAMES, parameters=[1, 2, 3], speeds=[1, 0])


def test_parameters_method_without_counts() -> None:
    with pytest.raises(ValueError, match=r"needs per-layer parameter counts"):
        plan_partition("parameters", 2, names=NAMES)


def test_profile_of_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"profile has 2 entries but there are 3 layers"):
        plan_partition("profile", 2, names=NAMES, profile=[1, 2])
