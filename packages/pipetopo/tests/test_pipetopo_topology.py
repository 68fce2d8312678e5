"""ProcessTopology: DeepSpeed's behavioural cases, ported, plus validation and value semantics."""

from __future__ import annotations

import copy
import math
import pickle
import re
from typing import Any

import pytest

import pipetopo
from pipetopo import (
    PipeDataParallelTopology,
    PipeModelDataParallelTopology,
    ProcessCoord,
    ProcessTopology,
    default_topology,
)

# --------------------------------------------------------------- DeepSpeed's cases, ported


def test_topology_2d() -> None:
    topo = ProcessTopology(axes=["row", "col"], dims=[2, 2])
    assert topo.world_size() == 4
    assert topo.get_rank(row=0, col=0) == 0
    assert topo.get_rank(row=0, col=1) == 1
    assert topo.get_rank(row=1, col=0) == 2
    assert topo.get_rank(row=1, col=1) == 3
    assert topo.get_axis_list(axis="row", idx=0) == [0, 1]
    assert topo.get_axis_list(axis="row", idx=1) == [2, 3]
    assert topo.get_axis_list(axis="col", idx=0) == [0, 2]
    assert topo.get_axis_list(axis="col", idx=1) == [1, 3]
    assert topo.get_coord(0) == topo.ProcessCoord(0, 0)
    assert topo.get_coord(1) == topo.ProcessCoord(0, 1)
    assert topo.get_coord(2) == topo.ProcessCoord(row=1, col=0)
    assert topo.get_coord(3) == (1, 1)
    assert topo.get_coord(3).row == 1


def test_topology_dims() -> None:
    topo = ProcessTopology(axes=["a", "b", "c"], dims=[2, 3, 4])
    assert topo.world_size() == 24
    assert (topo.get_dim("a"), topo.get_dim("b"), topo.get_dim("c")) == (2, 3, 4)


def test_topology_match() -> None:
    topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    assert topo.filter_match(pipe=0, data=1) == [2, 3]
    assert [topo.get_coord(r).model for r in topo.filter_match(pipe=0, data=1)] == [0, 1]


def test_topology_rank_repr() -> None:
    topo = ProcessTopology(axes=["a", "b"], dims=[2, 2])
    assert [topo.get_rank_repr(rank=r) for r in range(4)] == [
        "a_00-b_00",
        "a_00-b_01",
        "a_01-b_00",
        "a_01-b_01",
    ]
    assert topo.get_rank_repr(rank=3, inner_sep="+") == "a+01-b+01"
    assert topo.get_rank_repr(rank=3, inner_sep="🤗", outer_sep="_JEFF_") == "a🤗01_JEFF_b🤗01"
    assert topo.get_rank_repr(rank=3, omit_axes=["a"]) == "b_01"

    topo = ProcessTopology(axes=["pipe", "data"], dims=[2, 2])
    assert [topo.get_rank_repr(rank=r) for r in range(4)] == ["", "", "", ""]
    assert [topo.get_rank_repr(rank=r, omit_axes=["pipe"]) for r in range(4)] == [
        "data_00",
        "data_01",
        "data_00",
        "data_01",
    ]
    assert [topo.get_rank_repr(rank=r, omit_axes=[]) for r in range(4)] == [
        "pipe_00-data_00",
        "pipe_00-data_01",
        "pipe_01-data_00",
        "pipe_01-data_01",
    ]

    topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    assert [topo.get_rank_repr(rank=r) for r in range(8)] == ["model_00", "model_01"] * 4


def test_topology_rank_repr_pads_to_two_digits_only() -> None:
    topo = ProcessTopology(axes=["model"], dims=[128])
    assert topo.get_rank_repr(7) == "model_07"
    assert topo.get_rank_repr(127) == "model_127"


def test_topology_3d() -> None:
    topo = ProcessTopology(axes=["a", "b", "c"], dims=[2, 2, 2])
    expected = [(a, b, c) for a in range(2) for b in range(2) for c in range(2)]
    for rank, (a, b, c) in enumerate(expected):
        assert topo.get_rank(a=a, b=b, c=c) == rank
        assert topo.get_coord(rank) == topo.ProcessCoord(a, b, c)
        assert topo.get_coord(rank) == (a, b, c)

    assert topo.get_axis_list("a", 0) == [0, 1, 2, 3]
    assert topo.get_axis_list("a", 1) == [4, 5, 6, 7]
    assert topo.get_axis_list("b", 0) == [0, 1, 4, 5]
    assert topo.get_axis_list("b", 1) == [2, 3, 6, 7]
    assert topo.get_axis_list("c", 0) == [0, 2, 4, 6]
    assert topo.get_axis_list("c", 1) == [1, 3, 5, 7]

    assert topo.filter_match(a=0) == [0, 1, 2, 3]
    assert topo.filter_match(b=1, c=1) == [3, 7]
    assert topo.filter_match(a=1, b=1, c=1) == [7]
    assert topo.filter_match() == list(range(8))
    assert topo.get_coord(0).a == 0
    assert topo.get_coord(6).b == 1
    assert topo.get_coord(0) == topo.ProcessCoord(0, 0, 0)
    assert topo.get_coord(5) == topo.ProcessCoord(a=1, b=0, c=1)


def test_topology_comm_list() -> None:
    topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.get_axis_comm_lists("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.get_axis_comm_lists("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # An absent axis is not an error, so code for optional parallelisms needs no branch.
    assert topo.get_axis_comm_lists("jeff") == []


def test_axis_comm_lists_of_uneven_dims_are_row_major() -> None:
    topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[3, 2, 2])
    assert topo.get_axis_comm_lists("data") == [
        [0, 2],
        [1, 3],
        [4, 6],
        [5, 7],
        [8, 10],
        [9, 11],
    ]
    assert topo.get_axis_comm_lists("pipe") == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]


def test_prime_factor_default_split() -> None:
    assert default_topology(1) == PipeDataParallelTopology(num_pp=1, num_dp=1)
    assert default_topology(8) == PipeDataParallelTopology(num_pp=4, num_dp=2)
    assert default_topology(12) == PipeDataParallelTopology(num_pp=6, num_dp=2)
    assert default_topology(7) == PipeDataParallelTopology(num_pp=7, num_dp=1)
    assert default_topology(36) == PipeDataParallelTopology(num_pp=6, num_dp=6)
    for size in range(1, 30):
        topo = default_topology(size)
        assert topo.axes == ("pipe", "data")
        assert math.prod(topo.dims) == size
    with pytest.raises(ValueError, match="positive"):
        default_topology(0)


# ------------------------------------------------------------------ specialised topologies


def test_pipe_model_data_axis_order_differs_from_argument_order() -> None:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=3, num_dp=4)
    assert topo.axes == ("pipe", "data", "model")
    assert topo.dims == (2, 4, 3)
    assert topo.get_dim("model") == 3
    assert topo.get_dim("data") == 4
    # Model is fastest: the slices of one layer are consecutive ranks.
    assert topo.get_axis_comm_lists("model")[0] == [0, 1, 2]


def test_pipe_data_topology() -> None:
    topo = PipeDataParallelTopology(num_pp=3, num_dp=2)
    assert topo.get_axis_names() == ["pipe", "data"]
    assert topo.get_dim("model") == 0
    assert topo.get_axis_comm_lists("model") == []
    assert topo.get_axis_comm_lists("pipe") == [[0, 2, 4], [1, 3, 5]]


# ---------------------------------------------------------------------- value semantics


@pytest.mark.parametrize(
    "topo",
    [
        ProcessTopology(axes=["x", "y"], dims=[2, 3]),
        PipeDataParallelTopology(num_pp=4, num_dp=2),
        PipeModelDataParallelTopology(num_pp=2, num_mp=3, num_dp=4),
    ],
)
def test_repr_rebuilds_an_equal_topology_and_pickle_round_trips(topo: ProcessTopology) -> None:
    assert eval(repr(topo), vars(pipetopo)) == topo
    restored = pickle.loads(pickle.dumps(topo))
    assert restored == topo
    assert type(restored) is type(topo)
    assert copy.deepcopy(topo) == topo


def test_equality_and_hash_follow_axes_and_dims() -> None:
    assert PipeDataParallelTopology(2, 2) == ProcessTopology(["pipe", "data"], [2, 2])
    assert hash(PipeDataParallelTopology(2, 2)) == hash(ProcessTopology(["pipe", "data"], (2, 2)))
    assert ProcessTopology(["pipe", "data"], [2, 2]) != ProcessTopology(["data", "pipe"], [2, 2])
    assert ProcessTopology(["a"], [2]) != ProcessTopology(["a"], [3])
    assert len({ProcessTopology(["a"], [2]), ProcessTopology(("a",), (2,))}) == 1


def test_topology_is_immutable() -> None:
    topo = ProcessTopology(["a"], [2])
    with pytest.raises(AttributeError, match="immutable"):
        topo._dims = (3,)
    assert topo.world_size() == 2


def test_axes_accept_tuples_and_numpy_style_ints() -> None:
    class IndexLike:
        def __index__(self) -> int:
            return 3

    topo = ProcessTopology(("a", "b"), (2, IndexLike()))  # type: ignore[arg-type]
    assert topo.dims == (2, 3)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("axes", "dims", "error", "fragment"),
    [
        (["a", "a"], [2, 2], ValueError, "['a']"),
        (["pipe", "data", "pipe"], [1, 2, 3], ValueError, "unique"),
        (["a", "b"], [2], ValueError, "same length"),
        (["a"], [0], ValueError, "got 0"),
        (["a", "b"], [2, -3], ValueError, "got -3"),
        (["not valid"], [2], ValueError, "'not valid'"),
        (["class"], [2], ValueError, "'class'"),
        (["_hidden"], [2], ValueError, "'_hidden'"),
        (["values"], [2], ValueError, "reserved"),
        # Tuple methods of a coordinate: an axis of that name would hide them.
        (["pipe", "count"], [2, 2], ValueError, "reserved"),
        (["index"], [2], ValueError, "reserved"),
        ([], [], ValueError, "at least one axis"),
        (["a"], [2.0], TypeError, "2.0"),
        (["a"], [True], TypeError, "True"),
        ("ab", [1, 2], TypeError, "'ab'"),
        ([1], [2], TypeError, "1"),
    ],
)
def test_construction_rejects_bad_values_naming_them(
    axes: Any, dims: Any, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as caught:
        ProcessTopology(axes, dims)
    assert fragment in str(caught.value)


def test_partial_coordinate_points_to_filter_match() -> None:
    topo = ProcessTopology(["pipe", "data"], [2, 2])
    with pytest.raises(ValueError, match=r"filter_match") as caught:
        topo.get_rank(pipe=1)
    assert "['data']" in str(caught.value)


def test_out_of_range_coordinates_and_ranks_raise_value_error() -> None:
    topo = ProcessTopology(["pipe", "data"], [2, 3])
    with pytest.raises(ValueError, match=r"data=3 is out of range"):
        topo.get_rank(pipe=0, data=3)
    with pytest.raises(ValueError, match=r"pipe=-1 is out of range"):
        topo.get_rank(pipe=-1, data=0)
    with pytest.raises(ValueError, match=r"rank 6 is out of range"):
        topo.get_coord(6)
    with pytest.raises(ValueError, match=r"rank -1 is out of range"):
        topo.get_coord(-1)
    with pytest.raises(ValueError, match=r"out of range"):
        topo.filter_match(data=5)
    with pytest.raises(ValueError, match=r"out of range"):
        topo.get_rank_repr(10)


def test_unknown_axes_raise_value_error_listing_the_axes() -> None:
    topo = ProcessTopology(["pipe", "data"], [2, 2])
    with pytest.raises(ValueError, match=r"\['model'\].*\['pipe', 'data'\]"):
        topo.get_rank(pipe=0, data=0, model=0)
    with pytest.raises(ValueError, match=r"'model'"):
        topo.filter_match(model=0)
    with pytest.raises(ValueError, match=r"'model'"):
        topo.get_axis_list("model", 0)


def test_non_int_coordinates_raise_type_error() -> None:
    topo = ProcessTopology(["pipe"], [2])
    with pytest.raises(TypeError, match=r"1\.0"):
        topo.get_rank(pipe=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'0'"):
        topo.get_coord("0")  # type: ignore[arg-type]


def test_get_dim_of_an_absent_axis_is_zero() -> None:
    assert ProcessTopology(["pipe", "data"], [2, 2]).get_dim("model") == 0


# ------------------------------------------------------------------------- coordinates


def test_coordinate_reads_like_a_namedtuple() -> None:
    coord = ProcessTopology(["pipe", "data", "model"], [2, 3, 4]).get_coord(23)
    assert (coord.pipe, coord.data, coord.model) == (1, 2, 3)
    pipe, data, model = coord
    assert (pipe, data, model) == (1, 2, 3)
    assert coord[0] == 1
    assert len(coord) == 3
    assert repr(coord) == "ProcessCoord(pipe=1, data=2, model=3)"
    assert coord.as_dict() == {"pipe": 1, "data": 2, "model": 3}
    assert coord._asdict() == coord.as_dict()
    assert coord.replace(pipe=0) == ProcessCoord(("pipe", "data", "model"), (0, 2, 3))
    assert coord._replace(model=0).model == 0
    assert pickle.loads(pickle.dumps(coord)) == coord
    assert copy.copy(coord) == coord
    assert hash(coord) == hash(ProcessCoord(("pipe", "data", "model"), (1, 2, 3)))
    with pytest.raises(AttributeError, match="'expert'"):
        _ = coord.expert
    with pytest.raises(ValueError, match="expert"):
        coord.replace(expert=1)
    with pytest.raises(ValueError, match="one value per axis"):
        ProcessCoord(("a", "b"), (1,))


def test_package_exports() -> None:
    assert set(pipetopo.__all__) == {
        "PipeDataParallelTopology",
        "PipeModelDataParallelTopology",
        "PipelineParallelGrid",
        "ProcessCoord",
        "ProcessTopology",
        "WrongTypeError",
        "__version__",
        "default_if_none",
        "default_topology",
        "none_if_default",
    }
    assert isinstance(pipetopo.__version__, str)


def test_coordinates_equal_and_hash_like_plain_tuples() -> None:
    topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    coord = topo.get_coord(5)
    assert coord == (1, 0, 1)
    assert (1, 0, 1) == coord  # noqa: SIM300 - the plain tuple compares from the left too
    assert coord != (1, 0, 0)
    assert hash(coord) == hash((1, 0, 1))
    assert {(1, 0, 1): "found"}[coord] == "found"
    assert coord in {topo.ProcessCoord(1, 0, 1)}
    assert isinstance(coord, tuple)
    assert coord < topo.get_coord(6)
    assert sorted([topo.get_coord(r) for r in (7, 2, 5)]) == [(0, 1, 0), (1, 0, 1), (1, 1, 1)]
    assert coord.count(1) == 2
    assert coord.index(0) == 1
    assert coord[1:] == (0, 1)


def test_topology_process_coord_is_the_class_get_coord_returns() -> None:
    topo = ProcessTopology(axes=["pipe", "data"], dims=[2, 3])
    assert type(topo.get_coord(4)) is topo.ProcessCoord
    # One class per axis tuple, whichever topology asks.
    assert PipeDataParallelTopology(4, 1).ProcessCoord is topo.ProcessCoord
    assert ProcessTopology(["data", "pipe"], [3, 2]).ProcessCoord is not topo.ProcessCoord
    assert issubclass(topo.ProcessCoord, ProcessCoord)
    assert topo.ProcessCoord._fields == ("pipe", "data")
    assert topo.ProcessCoord(1, data=2) == topo.get_coord(5)
    assert topo.ProcessCoord._make([1, 2]) == topo.get_coord(5)
    assert topo.get_rank(**topo.ProcessCoord(1, 2)._asdict()) == 5


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ((1,), {}, "missing values for axes ['data']"),
        ((1, 2, 3), {}, "takes 2 values"),
        ((1,), {"pipe": 0}, "both by position and by name"),
        ((), {"pipe": 1, "model": 0}, "unknown axes ['model']"),
    ],
)
def test_topology_process_coord_binds_arguments_like_a_namedtuple(
    args: tuple[int, ...], kwargs: dict[str, int], fragment: str
) -> None:
    topo = ProcessTopology(axes=["pipe", "data"], dims=[2, 3])
    with pytest.raises(TypeError) as caught:
        topo.ProcessCoord(*args, **kwargs)
    assert fragment in str(caught.value)


def test_coordinate_keeps_the_axes_values_constructor() -> None:
    coord = ProcessCoord(("pipe", "data"), (1, 2))
    topo = ProcessTopology(["pipe", "data"], [2, 3])
    assert type(coord) is topo.ProcessCoord
    assert coord == topo.get_coord(5)
    assert ProcessCoord(axes=["pipe", "data"], values=[1, 2]) == coord
    assert (coord.axes, coord.values) == (("pipe", "data"), (1, 2))
    assert type(coord.values) is tuple
    assert coord.as_dict() == {"pipe": 1, "data": 2}
    assert coord.replace(data=0) == (1, 0)
    assert type(coord.replace(data=0)) is type(coord)
    with pytest.raises(TypeError, match="missing"):
        ProcessCoord(("pipe", "data"))
    with pytest.raises(TypeError, match=r"topology\.ProcessCoord"):
        ProcessCoord(pipe=1, data=2)
    with pytest.raises(ValueError, match="reserved"):
        ProcessCoord(("index",), (0,))
    with pytest.raises(ValueError, match="unique"):
        ProcessCoord(("a", "a"), (0, 0))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_coordinate_pickles_to_the_same_class(protocol: int) -> None:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    coord = topo.get_coord(11)
    restored = pickle.loads(pickle.dumps({"where": coord}, protocol=protocol))["where"]
    assert restored == coord
    assert type(restored) is topo.ProcessCoord
    assert restored.model == 1
    assert repr(restored) == "ProcessCoord(pipe=1, data=2, model=1)"


def test_coordinate_copies_are_equal_coordinates_of_the_same_class() -> None:
    coord = ProcessTopology(["pipe", "data"], [2, 2]).get_coord(3)
    for duplicate in (copy.copy(coord), copy.deepcopy(coord), copy.deepcopy([coord])[0]):
        assert duplicate == coord
        assert type(duplicate) is type(coord)
        assert duplicate.data == 1


@pytest.mark.parametrize(
    ("axes", "dims", "named"),
    [(["pipe"], [2.5], "2.5"), (["pipe"], ["2"], "'2'"), ([3], [2], "3"), (["a"], [True], "True")],
)
def test_wrongly_typed_axes_and_dims_are_also_value_errors(
    axes: list[Any], dims: list[Any], named: str
) -> None:
    # The issue and DeepSpeed users expect ValueError for a bad dim; it stays a TypeError too.
    with pytest.raises(ValueError, match=re.escape(named)) as caught:
        ProcessTopology(axes, dims)
    # One public name catches every wrongly typed argument, whichever base a caller prefers.
    assert isinstance(caught.value, pipetopo.WrongTypeError)
    assert isinstance(caught.value, TypeError)
