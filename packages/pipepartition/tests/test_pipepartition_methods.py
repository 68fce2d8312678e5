"""parse_method and plan_partition: methods parsed once, layers split as each method says."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipepartition import (
    Boundaries,
    Parameters,
    PartitionMethod,
    Profile,
    TypeRegex,
    Uniform,
    Weights,
    parse_method,
    partition_balanced,
    partition_uniform,
    plan_partition,
)

NAMES = ["Embedding"] + ["TransformerBlock"] * 8 + ["LayerNorm", "Head"]
PARAMETERS = [40] + [10] * 8 + [1, 40]

# -- parse_method -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("uniform", Uniform()),
        ("  Uniform\n", Uniform()),
        ("PARAMETERS", Parameters()),
        (" profile ", Profile()),
        ("type:Block", TypeRegex("Block")),
        ("TYPE:Block", TypeRegex("Block")),
        (r"type:\S+Block", TypeRegex(r"\S+Block")),
        ("type:a:b", TypeRegex("a:b")),
        ("type:Block ", TypeRegex("Block ")),
    ],
)
def test_strings_parse_to_typed_methods(text: str, expected: PartitionMethod) -> None:
    assert parse_method(text) == expected


def test_method_objects_pass_through_unchanged() -> None:
    for method in (
        Uniform(),
        Parameters(),
        Profile(),
        TypeRegex("x"),
        Boundaries((0, 1)),
        Weights((1.0,)),
    ):
        assert parse_method(method) is method


def test_keyword_methods_are_equal_only_to_themselves_and_print_as_their_keyword() -> None:
    keywords = [Uniform(), Parameters(), Profile()]
    assert [str(method) for method in keywords] == ["uniform", "parameters", "profile"]
    assert [repr(method) for method in keywords] == ["Uniform()", "Parameters()", "Profile()"]
    assert len(set(keywords)) == 3
    assert Uniform() == Uniform()
    assert keywords[0] != keywords[1]


def test_type_patterns_keep_their_case_and_match_names_ignoring_case() -> None:
    method = parse_method(r"type:\S+BLOCK")
    assert isinstance(method, TypeRegex)
    assert method.pattern == r"\S+BLOCK"
    assert method.matches("TransformerBlock")
    assert not method.matches("Block")  # \S+ needs at least one character before it
    assert str(method) == r"type:\S+BLOCK"


def test_unknown_methods_list_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown partition method 'paramters'; use 'uniform', 'parameters'"
    ):
        parse_method("paramters")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type:(", r"'type:\(' is not a valid regular expression"),
        ("type:", "needs a pattern after the colon"),
    ],
)
def test_bad_type_patterns_fail_at_parse_time(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_method(text)


def test_non_strings_are_type_errors() -> None:
    with pytest.raises(TypeError, match="method must be a str or a method object"):
        parse_method(3)  # type: ignore[arg-type]


def test_boundaries_and_weights_are_checked_on_construction() -> None:
    assert Boundaries([0, 2, 4]).boundaries == (0, 2, 4)  # any sequence, stored as a tuple
    with pytest.raises(ValueError, match="are not stage boundaries"):
        Boundaries((0, 3, 2))
    with pytest.raises(ValueError, match=r"weights\[0\] is -1"):
        Weights((-1.0,))


# -- plan_partition ---------------------------------------------------------------------------


def test_uniform_matches_partition_uniform_and_costs_one_per_layer() -> None:
    plan = plan_partition("uniform", 3, names=NAMES)
    assert list(plan.boundaries) == partition_uniform(len(NAMES), 3)
    assert set(plan.costs) == {1}
    assert plan.method == "uniform"


def test_parameters_balances_the_parameter_counts() -> None:
    plan = plan_partition("parameters", 3, names=NAMES, parameters=PARAMETERS)
    assert list(plan.boundaries) == partition_balanced(PARAMETERS, 3)
    assert plan.parameters == tuple(PARAMETERS)
    # 161 in all needs at least 54 per stage; in blocks of 10 next to 40, 60 is the least.
    assert plan.bottleneck == 60


def test_type_regex_balances_the_matching_layers() -> None:
    plan = plan_partition("type:block", 4, names=NAMES, parameters=PARAMETERS)
    assert list(plan.costs) == [0] + [1] * 8 + [0, 0]
    assert list(plan.stage_costs) == [2, 2, 2, 2]
    assert plan.method == "type:block"


def test_type_regex_matching_nothing_lists_the_names() -> None:
    with pytest.raises(
        ValueError,
        match=r"'type:Conv' matches none of the 11 layer names; the distinct names are "
        r"'Embedding', 'TransformerBlock', 'LayerNorm', 'Head'; .* e\.g\. 'type:TransformerBlock'",
    ):
        plan_partition("type:Conv", 2, names=NAMES)


def test_profile_balances_measured_costs_and_requires_them() -> None:
    profile = [0.5, 0.25, 0.25, 1.0]
    plan = plan_partition("profile", 2, names=["a", "b", "c", "d"], profile=profile)
    assert plan.boundaries == (0, 3, 4)
    with pytest.raises(ValueError, match="method 'profile' needs measured per-layer costs"):
        plan_partition("profile", 2, names=["a", "b"])


def test_parameters_requires_parameter_counts() -> None:
    with pytest.raises(ValueError, match="method 'parameters' needs per-layer parameter counts"):
        plan_partition("parameters", 2, names=["a", "b"])


def test_weights_are_balanced_and_must_match_the_layers() -> None:
    plan = plan_partition(Weights((3.0, 1.0, 1.0, 1.0)), 2, names=["a", "b", "c", "d"])
    assert plan.boundaries == (0, 1, 4)
    with pytest.raises(ValueError, match="Weights has 2 weights but there are 4 layers"):
        plan_partition(Weights((1.0, 1.0)), 2, names=["a", "b", "c", "d"])


def test_boundaries_are_used_as_given_and_checked_against_the_layers() -> None:
    plan = plan_partition(Boundaries((0, 1, 4)), 2, names=["a", "b", "c", "d"])
    assert plan.boundaries == (0, 1, 4)
    with pytest.raises(ValueError, match=r"describe 1 stages but num_stages is 2"):
        plan_partition(Boundaries((0, 4)), 2, names=["a", "b", "c", "d"])
    with pytest.raises(
        ValueError,
        match=r"end at 3 but there are 4 layers, leaving layers \[3, 4\) without a stage",
    ):
        plan_partition(Boundaries((0, 1, 3)), 2, names=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"leave stage 1 empty"):
        plan_partition(Boundaries((0, 2, 2, 4)), 3, names=["a", "b", "c", "d"])


def test_speeds_and_capacities_reach_the_balanced_split() -> None:
    plan = plan_partition("parameters", 2, names=["a"] * 6, parameters=[1] * 6, speeds=[1.0, 2.0])
    assert list(plan.stage_costs) == [2, 4]
    assert plan.speeds == (1.0, 2.0)
    limited = plan_partition(
        "parameters", 2, names=["a"] * 6, parameters=[1] * 6, capacities=[1, 100], sizes=[1] * 6
    )
    assert limited.boundaries == (0, 1, 6)


def test_uniform_checks_capacities_it_cannot_respect() -> None:
    with pytest.raises(
        ValueError,
        match=r"stage 0 holds layers \[0, 2\) that need 2 but its "
        r"capacity is 1; method 'uniform' places layers without",
    ):
        plan_partition("uniform", 2, names=["a"] * 4, capacities=[1, 9])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"names": "abc"}, TypeError, "names must be a sequence of str"),
        ({"names": ["a", 1]}, TypeError, r"names\[1\] is 1 of type int"),
        ({"names": ["a", "b"], "parameters": [1]}, ValueError, "parameters has 1 entry but"),
        ({"names": ["a", "b"], "parameters": [1, -1]}, ValueError, r"parameters\[1\] is -1"),
        ({"names": ["a", "b"], "speeds": [1.0]}, ValueError, "speeds has 1 entry but there"),
        ({"names": ["a"], "num_stages": 0}, ValueError, "num_stages is 0"),
        ({"names": ["a"], "num_stages": 2.0}, TypeError, "num_stages must be an int"),
        ({"names": ["a", "b"], "parameters": 5}, TypeError, "parameters must be a sequence"),
        (
            {"names": ["a", "b"], "capacities": [1.0]},
            ValueError,
            "capacities has 1 entry but there are 2 stages; pass one value per stage",
        ),
        (
            {"names": ["a", "b"], "sizes": [1, 1]},
            ValueError,
            r"sizes only matter together with capacities; pass capacities=\[\.\.\.\] with one "
            "limit per stage",
        ),
        (
            {"names": ["a", "b"], "capacities": [9, 9], "sizes": [1]},
            ValueError,
            r"sizes has 1 entry but there are 2 layers \(one per name\); pass one size per layer",
        ),
    ],
)
def test_bad_arguments_are_named(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    arguments: dict[str, object] = {"num_stages": 2, **kwargs}
    with pytest.raises(error, match=message):
        plan_partition("uniform", **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["parameters", Weights((1.0, 2.0, 3e9, 1.0))])
def test_capacity_messages_speak_of_layers_and_stages(method: str | PartitionMethod) -> None:
    with pytest.raises(
        ValueError,
        match=r"layer 2 alone needs 3,000,000,000 but the largest capacity is 2,000,000,000 "
        r"\(stage 1\); raise that capacity to at least 3,000,000,000 or split layer 2",
    ):
        plan_partition(
            method,
            2,
            names=["a", "b", "c", "d"],
            parameters=[1, 2, 3_000_000_000, 1],
            capacities=[1e9, 2e9],
        )


def test_fewer_layers_than_stages_checks_capacities_in_layers_and_stages() -> None:
    with pytest.raises(
        ValueError,
        match=r"stage 1 holds layers \[1, 2\) that need 2 but its capacity is 1; with fewer "
        r"layers \(2\) than stages \(4\) stage s holds layer s alone; reorder the capacities "
        r"or use at most 2 stages",
    ):
        plan_partition("parameters", 4, names=["a", "b"], parameters=[1, 2], capacities=[1] * 4)


@given(
    st.lists(st.sampled_from(["Embedding", "Block", "Head"]), min_size=1, max_size=20),
    st.integers(1, 6),
    st.sampled_from(["uniform", "parameters", "type:Block", "profile"]),
)
def test_no_stage_is_empty_when_there_are_enough_layers(
    names: list[str], num_stages: int, method: str
) -> None:
    if method == "type:Block" and "Block" not in names:
        names = [*names, "Block"]
    plan = plan_partition(
        method,
        num_stages,
        names=names,
        parameters=[len(name) for name in names],
        profile=[0.1 * len(name) for name in names],
    )
    assert plan.num_layers == len(names)
    assert plan.names == tuple(names)
    if len(names) >= num_stages:
        assert all(len(stage) > 0 for stage in plan.stages)
    else:
        assert list(plan.boundaries) == partition_uniform(len(names), num_stages)
