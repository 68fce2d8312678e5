"""PartitionPlan: validated on construction, consistent lookups, a readable table, JSON."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipepartition import Boundaries, PartitionPlan

TIMES = "\u00d7"  # the multiplication sign in "24\u00d7Block"


@st.composite
def plans(draw: st.DrawFn) -> PartitionPlan:
    num_layers = draw(st.integers(0, 30))
    num_stages = draw(st.integers(1, 8))
    cuts = sorted(
        draw(st.lists(st.integers(0, num_layers), min_size=num_stages - 1, max_size=num_stages - 1))
    )
    costs = draw(
        st.lists(
            st.integers(0, 10**12) | st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
            min_size=num_layers,
            max_size=num_layers,
        )
    )
    names = draw(
        st.none()
        | st.lists(
            st.sampled_from(["Embedding", "Block", "Head"]),
            min_size=num_layers,
            max_size=num_layers,
        )
    )
    parameters = draw(
        st.none() | st.lists(st.integers(0, 10**9), min_size=num_layers, max_size=num_layers)
    )
    speeds = draw(
        st.none() | st.lists(st.floats(0.1, 10), min_size=num_stages, max_size=num_stages)
    )
    return PartitionPlan(
        boundaries=(0, *cuts, num_layers),
        costs=tuple(costs),
        names=None if names is None else tuple(names),
        parameters=None if parameters is None else tuple(parameters),
        method=draw(st.sampled_from(["uniform", "parameters", "type:\\S+Block", "profile"])),
        speeds=None if speeds is None else tuple(speeds),
    )


def example_plan() -> PartitionPlan:
    names = ["Embedding"] + ["Block"] * 6 + ["LayerNorm", "Head"]
    parameters = [50, 10, 10, 10, 10, 10, 10, 1, 50]
    return PartitionPlan.from_boundaries(
        [0, 3, 7, 9], costs=parameters, names=names, parameters=parameters, method="parameters"
    )


# -- lookups ----------------------------------------------------------------------------------


@given(plans())
def test_every_layer_is_owned_by_exactly_one_stage_in_order(plan: PartitionPlan) -> None:
    owners = [plan.stage_of(layer) for layer in range(plan.num_layers)]
    assert owners == sorted(owners)
    for layer, stage in enumerate(owners):
        assert layer in plan.layers_of(stage)
    assert [layer for stage in plan.stages for layer in stage] == list(range(plan.num_layers))
    assert len(plan.stages) == plan.num_stages


@given(plans())
def test_stage_costs_add_up_and_the_bottleneck_is_the_slowest_stage(plan: PartitionPlan) -> None:
    assert len(plan.stage_costs) == plan.num_stages
    assert sum(plan.stage_costs) == pytest.approx(sum(plan.costs), rel=1e-9, abs=1e-6)
    speeds = plan.speeds or (1.0,) * plan.num_stages
    assert plan.bottleneck == max(c / s for c, s in zip(plan.stage_costs, speeds, strict=True))
    assert plan.imbalance >= 1.0 - 1e-9


def test_stage_of_skips_empty_stages() -> None:
    plan = PartitionPlan.from_boundaries([0, 2, 2, 4])
    assert [plan.stage_of(layer) for layer in range(4)] == [0, 0, 2, 2]
    assert plan.layers_of(1) == range(2, 2)


def test_lookups_out_of_range_name_the_valid_range() -> None:
    plan = PartitionPlan.from_boundaries([0, 2, 4])
    with pytest.raises(ValueError, match=r"layer 4 is outside this plan's layers 0\.\.3"):
        plan.stage_of(4)
    with pytest.raises(ValueError, match=r"layer -1 is outside"):
        plan.stage_of(-1)
    with pytest.raises(ValueError, match=r"stage 2 is outside this plan's stages 0\.\.1"):
        plan.layers_of(2)
    with pytest.raises(TypeError, match="layer must be an int"):
        plan.stage_of(1.0)  # type: ignore[arg-type]


def test_lookups_in_a_plan_without_layers_say_it_has_none() -> None:
    plan = PartitionPlan.from_boundaries([0, 0])
    with pytest.raises(ValueError, match="layer 0 does not exist: this plan has no layers"):
        plan.stage_of(0)
    assert plan.layers_of(0) == range(0, 0)


def test_speeds_divide_stage_costs_and_imbalance_is_relative_to_the_speed_share() -> None:
    plan = PartitionPlan.from_boundaries([0, 2, 6], costs=[1] * 6, speeds=[1.0, 2.0])
    assert list(plan.stage_costs) == [2, 4]
    assert plan.stage_times == (2.0, 2.0)
    assert plan.bottleneck == 2.0
    assert plan.imbalance == 1.0


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"boundaries": (1, 2), "costs": (1, 1)}, ValueError, r"start at 1; the first must be 0"),
        ({"boundaries": (0, 3, 2), "costs": (1, 1)}, ValueError, r"decrease at stage 1"),
        (
            {"boundaries": (0, 2), "costs": (1,)},
            ValueError,
            r"end at 2 but costs has 1 entry \(one per layer\), placing layers \[1, 2\) that",
        ),
        ({"boundaries": (0,), "costs": ()}, ValueError, r"describe no stage"),
        ({"boundaries": (0, 1.5), "costs": (1,)}, TypeError, r"boundaries\[1\] must be an int"),
        ({"boundaries": (0, True), "costs": (1,)}, TypeError, r"boundaries\[1\] must be an int"),
        ({"boundaries": (0, 1), "costs": (-1,)}, ValueError, r"costs\[0\] is -1"),
        (
            {"boundaries": (0, 2), "costs": (1, 1), "names": ("a",)},
            ValueError,
            r"names has 1 entry but the plan has 2 layers",
        ),
        ({"boundaries": (0, 1), "costs": (1,), "names": (3,)}, TypeError, r"names\[0\] is 3"),
        (
            {"boundaries": (0, 1), "costs": (1,), "parameters": (1, 2)},
            ValueError,
            r"parameters has 2 entries but the plan has 1 layer;",
        ),
        (
            {"boundaries": (0, 1), "costs": (1,), "parameters": (-5,)},
            ValueError,
            r"parameters\[0\] is -5",
        ),
        (
            {"boundaries": (0, 1), "costs": (1,), "speeds": (1.0, 2.0)},
            ValueError,
            r"speeds has 2 entries but there are 1 stage;",
        ),
        ({"boundaries": (0, 1), "costs": (1,), "method": ""}, ValueError, r"non-empty str"),
        ({"boundaries": (0, 1), "costs": (1,), "method": 3}, TypeError, r"non-empty str"),
        ({"boundaries": (0, 1), "costs": (1,), "names": "a"}, TypeError, r"sequence of str"),
        ({"boundaries": (0, 1), "costs": (1,), "parameters": 5}, TypeError, r"sequence of ints"),
        ({"boundaries": 3, "costs": (1,)}, TypeError, r"boundaries must be a sequence of ints"),
    ],
)
def test_invalid_plans_are_refused_with_the_reason(
    fields: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        PartitionPlan(**fields)  # type: ignore[arg-type]


def test_boundaries_are_refused_with_one_message_wherever_they_come_from() -> None:
    message = r"boundaries \[0, 3, 2\] are not stage boundaries: they decrease at stage 1"
    with pytest.raises(ValueError, match=message):
        PartitionPlan((0, 3, 2), (1, 1))
    with pytest.raises(ValueError, match=message):
        PartitionPlan.from_boundaries([0, 3, 2])
    with pytest.raises(ValueError, match=message):
        Boundaries([0, 3, 2])


def test_from_boundaries_checks_names_rather_than_splitting_a_string() -> None:
    with pytest.raises(TypeError, match="names must be a sequence of str"):
        PartitionPlan.from_boundaries([0, 2], names="ab")


def test_plans_are_frozen_and_lists_become_tuples() -> None:
    plan = PartitionPlan([0, 1, 2], [1, 1.5])  # type: ignore[arg-type]
    assert plan.boundaries == (0, 1, 2)
    assert list(plan.costs) == [1, 1.5]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.method = "other"  # type: ignore[misc]


def test_from_boundaries_defaults_to_one_cost_per_layer() -> None:
    plan = PartitionPlan.from_boundaries([0, 3, 5])
    assert list(plan.costs) == [1, 1, 1, 1, 1]
    assert list(plan.stage_costs) == [3, 2]
    assert plan.method == "explicit"


# -- table ------------------------------------------------------------------------------------


def test_table_shows_ranges_compressed_names_costs_parameters_and_load() -> None:
    lines = example_plan().table().splitlines()
    assert lines[0].split() == ["stage", "layers", "count", "cost", "params", "load", "names"]
    assert lines[1].split() == [
        "0",
        "0..2",
        "3",
        "70",
        "70",
        "100.0%",
        "Embedding,",
        f"2{TIMES}Block",
    ]
    assert lines[2].split() == ["1", "3..6", "4", "40", "40", "57.1%", f"4{TIMES}Block"]
    assert lines[3].split() == ["2", "7..8", "2", "51", "51", "72.9%", "LayerNorm,", "Head"]
    assert lines[4] == "bottleneck 70 (stage 0), imbalance 1.304, method parameters"
    assert len(lines) == 5


def test_table_columns_line_up() -> None:
    lines = example_plan().table().splitlines()[:4]
    load_ends = {line.index("%") for line in lines[1:]}
    assert len(load_ends) == 1


def test_table_with_speeds_shows_speed_and_time_and_marks_empty_stages() -> None:
    plan = PartitionPlan.from_boundaries([0, 2, 2], costs=[3, 3], speeds=[2.0, 1.0])
    lines = plan.table().splitlines()
    assert lines[0].split() == ["stage", "layers", "count", "cost", "speed", "time", "load"]
    assert lines[1].split() == ["0", "0..1", "2", "6", "2", "3", "100.0%"]
    assert lines[2].split() == ["1", "-", "0", "0", "1", "0", "0.0%"]


def test_table_extra_columns_go_right_aligned_just_before_load() -> None:
    table = example_plan().table(
        extra_columns={"memory": ["1.5 GiB", "900 MiB", "12 KiB"], "rank": ["0", "1", "2"]}
    )
    lines = table.splitlines()
    assert lines[0].split() == [
        "stage", "layers", "count", "cost", "params", "memory", "rank", "load", "names"
    ]  # fmt: skip
    assert lines[1].split()[5:8] == ["1.5", "GiB", "0"]
    memory_ends = {line.index("B") for line in lines[1:4]}
    assert len(memory_ends) == 1  # right-aligned: the unit letters line up
    assert lines[0].index("memory") + len("memory") == lines[1].index("B") + 1
    assert lines[4] == example_plan().table().splitlines()[4]  # the footer is unchanged


def test_table_extra_columns_without_parameters_or_names() -> None:
    plan = PartitionPlan.from_boundaries([0, 1, 2], costs=[1, 3])
    assert plan.table(extra_columns={"memory": ["10 B", "2 B"]}) == (
        "stage  layers  count  cost  memory    load\n"
        "    0  0..0        1     1    10 B   33.3%\n"
        "    1  1..1        1     3     2 B  100.0%\n"
        "bottleneck 3 (stage 1), imbalance 1.500, method explicit"
    )


def test_table_names_override_the_plans_names_and_are_compressed() -> None:
    names = ["Embedding*"] + ["Block"] * 6 + ["LayerNorm", "Head*"]
    lines = example_plan().table(names=names).splitlines()
    assert lines[1].split()[-2:] == ["Embedding*,", f"2{TIMES}Block"]
    assert lines[3].split()[-2:] == ["LayerNorm,", "Head*"]
    unnamed = PartitionPlan.from_boundaries([0, 2, 3], costs=[1, 1, 1])
    assert unnamed.table(names=["a", "a", "b"]).splitlines()[1].endswith(f"2{TIMES}a")


def test_table_max_names_width_cuts_long_names_with_an_ellipsis() -> None:
    lines = example_plan().table(max_names_width=12).splitlines()
    assert lines[1].endswith("Embedding...")
    assert lines[2].endswith(f"4{TIMES}Block")  # short enough: kept whole
    assert lines[3].endswith("LayerNorm...")
    assert all(len(line.split("  ")[-1]) <= 12 for line in lines[1:4])
    assert example_plan().table(max_names_width=3).splitlines()[1].endswith("  ...")


def test_table_without_options_is_the_default_table() -> None:
    plan = example_plan()
    assert plan.table(extra_columns={}, names=plan.names, max_names_width=None) == plan.table()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"extra_columns": [("memory", ["1"] * 3)]}, TypeError, "extra_columns must be a mapping"),
        ({"extra_columns": {1: ["1"] * 3}}, TypeError, "header 1 is of type int"),
        ({"extra_columns": {"load": ["1"] * 3}}, ValueError, "'load' is empty or already a column"),
        ({"extra_columns": {"": ["1"] * 3}}, ValueError, "'' is empty or already a column"),
        ({"extra_columns": {"m": "123"}}, TypeError, r"extra_columns\['m'\] must be a sequence"),
        ({"extra_columns": {"m": ["1", 2, "3"]}}, TypeError, r"extra_columns\['m'\]\[1\] is 2"),
        (
            {"extra_columns": {"m": ["1", "2"]}},
            ValueError,
            r"extra_columns\['m'\] has 2 entries but the plan has 3 stages; pass one cell per",
        ),
        ({"names": ["a"] * 8}, ValueError, "names has 8 entries but the plan has 9 layers"),
        ({"names": "abcdefghi"}, TypeError, "names must be a sequence of str"),
        ({"max_names_width": 2}, ValueError, "max_names_width is 2; it must be an integer >= 3"),
        ({"max_names_width": 8.0}, TypeError, "max_names_width must be an int"),
    ],
)
def test_bad_table_options_are_named(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        example_plan().table(**options)  # type: ignore[arg-type]


def test_table_of_an_all_zero_plan_has_no_percentages() -> None:
    plan = PartitionPlan.from_boundaries([0, 1, 2], costs=[0, 0])
    assert plan.table().splitlines()[1].split()[-1] == "-"
    assert plan.imbalance == 1.0


# -- serialisation ------------------------------------------------------------------------------


@given(plans())
def test_json_round_trip_restores_an_equal_plan(plan: PartitionPlan) -> None:
    restored = PartitionPlan.from_json(plan.to_json())
    assert restored == plan
    assert restored.stage_costs == plan.stage_costs
    assert [type(cost) for cost in restored.costs] == [type(cost) for cost in plan.costs]


def test_to_dict_holds_plain_values() -> None:
    data = example_plan().to_dict()
    assert data["boundaries"] == [0, 3, 7, 9]
    assert data["method"] == "parameters"
    assert data["speeds"] is None
    assert PartitionPlan.from_dict(data) == example_plan()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a JSON plan"),
        ('{"boundaries": [0, 1], "costs": [1], "colour": 1}', r"unknown plan fields \['colour'\]"),
        ('{"costs": [1]}', r"needs the fields \['boundaries'\]"),
    ],
)
def test_from_json_explains_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PartitionPlan.from_json(text)


def test_from_json_of_a_non_object_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="mapping of fields"):
        PartitionPlan.from_json("[0, 1]")
