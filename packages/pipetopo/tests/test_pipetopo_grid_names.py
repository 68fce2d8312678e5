"""The grid's core API, and DeepSpeed's and Megatron's names agreeing with it on every rank."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipetopo import (
    PipeDataParallelTopology,
    PipelineParallelGrid,
    PipeModelDataParallelTopology,
    ProcessTopology,
    WrongTypeError,
    default_if_none,
)
from pipetopo.testing import fake_world, spawn_ranks

_TIMEOUT_S = 90.0


def _members(group: ProcessGroup | None) -> list[int]:
    return list(dist.get_process_group_ranks(default_if_none(group)))


def _line(grid: PipelineParallelGrid, axis: str) -> list[int]:
    """This rank's global ranks along ``axis``, from the topology alone."""
    others = {a: v for a, v in grid.coord.as_dict().items() if a != axis}
    return [grid.to_global_rank(r) for r in grid.topology().filter_match(**others)]


def check_core(grid: PipelineParallelGrid) -> None:
    """The core's answers against the topology's arithmetic."""
    topo, me = grid.topology(), grid.topology_rank
    assert grid.axes == topo.axes
    for axis in grid.axes:
        ranks = grid.axis_ranks(axis)
        assert isinstance(ranks, tuple)
        assert list(ranks) == _line(grid, axis)
        assert grid.axis_size(axis) == topo.get_dim(axis) == len(ranks)
        assert grid.axis_rank(axis) == grid.coord.as_dict()[axis]
        assert ranks[grid.axis_rank(axis)] == grid.to_global_rank(me)
        assert _members(grid.axis_group(axis)) == list(ranks)
    replica = grid.replica_ranks()
    assert isinstance(replica, tuple)
    assert list(replica) == [
        grid.to_global_rank(r) for r in topo.filter_match(data=grid.coord.data)
    ]
    assert _members(grid.replica_group()) == list(replica)
    assert grid.stage_id == grid.axis_rank("pipe")
    assert grid.num_stages == grid.axis_size("pipe")
    assert grid.is_first_stage == (grid.stage_id == 0)
    assert grid.is_last_stage == (grid.stage_id == grid.num_stages - 1)


def check_names_agree(grid: PipelineParallelGrid) -> None:
    """Every DeepSpeed and Megatron name says what the core says, in DeepSpeed's types."""
    topo, me = grid.topology(), grid.topology_rank
    # DeepSpeed's grid: identity and sizes.
    assert grid._topo is topo
    assert grid._is_grid_valid()
    assert grid.world_size == topo.world_size()
    assert grid.global_rank == grid.get_global_rank() == grid.to_global_rank(me)
    assert grid.get_stage_id() == grid.stage_id
    assert grid.data_parallel_id == grid.get_data_parallel_id() == grid.axis_rank("data")
    assert grid.pipe_parallel_size == grid.num_stages
    assert grid.data_parallel_size == grid.axis_size("data")
    # Pipe: DeepSpeed's MPU and Megatron's parallel_state.
    pipe = grid.get_pipe_parallel_group()
    assert isinstance(pipe, ProcessGroup)
    assert pipe is default_if_none(grid.axis_group("pipe"))
    assert grid.pp_proc_group is pipe
    assert grid.get_pipeline_model_parallel_group() is pipe
    assert grid.pp_group == list(grid.axis_ranks("pipe"))
    assert isinstance(grid.pp_group, list)
    assert grid.get_pipe_parallel_rank() == grid.get_pipeline_model_parallel_rank() == grid.stage_id
    assert grid.get_pipe_parallel_world_size() == grid.num_stages
    assert grid.get_pipeline_model_parallel_world_size() == grid.num_stages
    # Data.
    data = grid.get_data_parallel_group()
    assert data is default_if_none(grid.axis_group("data"))
    assert grid.dp_proc_group is data
    assert grid.dp_group == grid.get_data_parallel_group_ranks() == list(grid.axis_ranks("data"))
    assert grid.get_data_parallel_rank() == grid.axis_rank("data")
    assert grid.get_data_parallel_world_size() == grid.axis_size("data")
    # DeepSpeed's "model parallel": a whole replica, pipe x model.
    replica = grid.get_model_parallel_group()
    assert replica is default_if_none(grid.replica_group())
    assert grid.ds_model_proc_group is replica
    assert grid.get_model_parallel_world_size() == grid.ds_model_world_size
    assert grid.ds_model_world_size == len(grid.replica_ranks())
    position = grid.replica_ranks().index(grid.to_global_rank(me))
    assert grid.get_model_parallel_rank() == grid.ds_model_rank == position
    # Slices (the model axis), and their Megatron names.
    slices = grid.get_slice_parallel_group()
    assert grid.slice_proc_group is grid.get_tensor_model_parallel_group() is slices
    if "model" in grid.axes:
        assert slices is default_if_none(grid.axis_group("model"))
        assert grid.slice_group == list(grid.axis_ranks("model"))
        assert grid.get_slice_parallel_rank() == grid.axis_rank("model")
        assert grid.model_parallel_size == grid.axis_size("model")
    else:
        assert slices is default_if_none(grid.group_of([me]))
        assert grid.slice_group == [grid.to_global_rank(me)]
        assert grid.get_slice_parallel_rank() == 0
        assert grid.model_parallel_size == 1
    assert grid.get_tensor_model_parallel_rank() == grid.get_slice_parallel_rank()
    assert grid.slice_parallel_size == grid.model_parallel_size
    assert grid.get_slice_parallel_world_size() == grid.model_parallel_size
    assert grid.get_tensor_model_parallel_world_size() == grid.model_parallel_size
    # pipestack's earlier per-axis names.
    for axis in grid.axes:
        assert grid.get_axis_group(axis) is default_if_none(grid.axis_group(axis))
        assert grid.get_axis_group_ranks(axis) == list(grid.axis_ranks(axis))
    # Every line of the grid, and DeepSpeed's wrapping pairs.
    for axis, lines in (("pipe", grid.pipe_groups), ("data", grid.dp_groups)):
        comm = topo.get_axis_comm_lists(axis)
        assert lines == [[grid.to_global_rank(r) for r in line] for line in comm]
    after_me = grid.next_stage_rank if not grid.is_last_stage else grid.stage_to_global(0)
    assert grid.p2p_groups[me] == [grid.to_global_rank(me), after_me]
    assert len(grid.p2p_groups) == grid.world_size


@contextmanager
def _world_grid(world: int, rank: int, topology: ProcessTopology) -> Iterator[PipelineParallelGrid]:
    with fake_world(world, rank):
        yield PipelineParallelGrid(topology)


@contextmanager
def _odd_ranks_grid(
    world: int, rank: int, topology: ProcessTopology
) -> Iterator[PipelineParallelGrid]:
    """A grid on the odd ranks of the world; the even ranks hold a group of their own."""
    with fake_world(world, rank):
        odd = dist.new_group(list(range(1, world, 2)))
        dist.new_group(list(range(0, world, 2)))
        yield PipelineParallelGrid(topology, process_group=odd)


_Layout = Callable[[int, int, ProcessTopology], AbstractContextManager[PipelineParallelGrid]]
_LAYOUTS: list[tuple[str, _Layout, int, ProcessTopology, list[int]]] = [
    ("pipe4xdata2", _world_grid, 8, PipeDataParallelTopology(num_pp=4, num_dp=2), [0, 3, 6, 7]),
    ("pipe4 alone", _world_grid, 4, PipeDataParallelTopology(num_pp=4, num_dp=1), [0, 2, 3]),
    ("data4 alone", _world_grid, 4, PipeDataParallelTopology(num_pp=1, num_dp=4), [1]),
    ("pipe2xdata3xmodel2", _world_grid, 12, PipeModelDataParallelTopology(2, 2, 3), [0, 5, 11]),
    (
        "model axis first",
        _world_grid,
        8,
        ProcessTopology(["model", "pipe", "data"], [2, 2, 2]),
        [5],
    ),
    ("odd ranks pipe2xdata2", _odd_ranks_grid, 8, PipeDataParallelTopology(2, 2), [1, 5, 7]),
    ("odd ranks 3d", _odd_ranks_grid, 16, PipeModelDataParallelTopology(2, 2, 2), [3, 9, 15]),
]


@pytest.mark.parametrize(
    ("layout", "world", "topology", "rank"),
    [
        pytest.param(layout, world, topo, rank, id=f"{name}-rank{rank}")
        for name, layout, world, topo, ranks in _LAYOUTS
        for rank in ranks
    ],
)
def test_names_agree_with_the_core(
    layout: _Layout, world: int, topology: ProcessTopology, rank: int
) -> None:
    with layout(world, rank, topology) as grid:
        check_core(grid)
        check_names_agree(grid)


# ------------------------------------------------------------- groups that objects keep


def test_core_groups_are_none_where_they_are_the_default_group() -> None:
    with fake_world(4, rank=2):
        grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=4, num_dp=1))
        # The pipe line and the replica are the whole world: torch's None, not a reference.
        assert grid.axis_group("pipe") is None
        assert grid.replica_group() is None
        assert grid.group_of(range(4)) is None
        data = grid.axis_group("data")  # this rank alone, a group of its own
        assert data is not None
        assert _members(data) == [2]
        # The DeepSpeed names and group_for hand out the default group itself.
        assert grid.get_pipe_parallel_group() is dist.group.WORLD
        assert grid.get_model_parallel_group() is dist.group.WORLD
        assert grid.group_for([0, 1, 2, 3]) is dist.group.WORLD
        assert grid.process_group is dist.group.WORLD


def test_core_groups_on_a_sub_group_are_the_sub_group_not_none() -> None:
    with fake_world(8, rank=3):
        odd = dist.new_group([1, 3, 5, 7])
        dist.new_group([0, 2, 4, 6])
        grid = PipelineParallelGrid(PipeDataParallelTopology(4, 1), process_group=odd)
        assert grid.axis_group("pipe") is odd
        assert grid.replica_group() is odd
        assert grid.group_of([0, 1, 2, 3]) is odd


def test_no_core_group_is_none_when_no_line_spans_the_world() -> None:
    with fake_world(8, rank=6):
        grid = PipelineParallelGrid(PipeModelDataParallelTopology(2, 2, 2))
        groups = [grid.axis_group(axis) for axis in grid.axes] + [grid.replica_group()]
        assert all(isinstance(group, ProcessGroup) for group in groups)


def test_group_of_finds_created_groups_without_communicating() -> None:
    with fake_world(8, rank=3):
        grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=4, num_dp=2))
        tie = grid.group_for([7, 3])
        assert grid.group_for([0, 6]) is None  # created everywhere; rank 3 is not in it
        calls = (grid.group_creation_calls, grid.local_group_creation_calls)
        assert grid.group_of([3, 7]) is tie
        assert grid.group_of((7, 3, 3)) is tie
        assert grid.group_of([1, 3, 5, 7]) is grid.axis_group("pipe")
        assert grid.group_of([2, 3]) is grid.axis_group("data")
        assert _members(grid.group_of([3])) == [3]  # the slice group without a model axis
        assert (grid.group_creation_calls, grid.local_group_creation_calls) == calls


def test_group_of_refuses_non_members_and_sets_never_created() -> None:
    with fake_world(8, rank=3):
        grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=4, num_dp=2))
        grid.group_for([0, 6])
        with pytest.raises(ValueError, match=r"\[0, 6\], which do not include this rank \(3\)"):
            grid.group_of([6, 0])
        with pytest.raises(ValueError, match=r"no group of topology ranks \[3, 5\].*group_for"):
            grid.group_of([5, 3])
        with pytest.raises(ValueError, match="rank 8 is out of range"):
            grid.group_of([3, 8])
        with pytest.raises(ValueError, match="no ranks"):
            grid.group_of([])
        with pytest.raises(WrongTypeError, match="sequence of topology ranks"):
            grid.group_of(3)  # type: ignore[arg-type]


def test_unknown_axes_are_refused_naming_the_axes() -> None:
    with fake_world(4, rank=0):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        asks: list[Callable[[str], object]] = [
            grid.axis_size,
            grid.axis_rank,
            grid.axis_ranks,
            grid.axis_group,
            grid.get_axis_group,
        ]
        for ask in asks:
            with pytest.raises(
                ValueError, match=r"no axis 'model'; its axes are \['pipe', 'data'"
            ) as e:
                ask("model")
            assert "pass one of those" in str(e.value)


def test_wrongly_typed_grid_arguments_raise_the_public_type_error() -> None:
    with fake_world(4, rank=0):
        with pytest.raises(WrongTypeError, match="ProcessTopology"):
            PipelineParallelGrid((2, 2))  # type: ignore[arg-type]
        with pytest.raises(WrongTypeError, match="ProcessGroup"):
            PipelineParallelGrid(process_group=0)  # type: ignore[arg-type]
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        with pytest.raises(WrongTypeError, match=r"got 1\.0 of type float"):
            grid.to_global_rank(1.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="sequence"):  # also a ValueError, for DeepSpeed
            grid.group_for("03")  # type: ignore[arg-type]


# ---------------------------------------------------------------- neighbouring stages


@pytest.mark.parametrize(
    ("world", "topology", "rank", "neighbours"),
    [
        (8, PipeDataParallelTopology(4, 2), 0, (None, 2)),
        (8, PipeDataParallelTopology(4, 2), 3, (1, 5)),
        (8, PipeDataParallelTopology(4, 2), 7, (5, None)),
        (4, PipeDataParallelTopology(1, 4), 2, (None, None)),
        (8, PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2), 6, (2, None)),
        (12, PipeModelDataParallelTopology(num_pp=3, num_mp=2, num_dp=2), 5, (1, 9)),
    ],
)
def test_prev_and_next_stage_ranks(
    world: int, topology: ProcessTopology, rank: int, neighbours: tuple[int | None, int | None]
) -> None:
    with fake_world(world, rank):
        grid = PipelineParallelGrid(topology)
        assert (grid.prev_stage_rank, grid.next_stage_rank) == neighbours


def test_prev_and_next_stage_ranks_on_a_sub_group_are_global() -> None:
    with fake_world(8, rank=3):
        odd = dist.new_group([1, 3, 5, 7])
        dist.new_group([0, 2, 4, 6])
        grid = PipelineParallelGrid(PipeDataParallelTopology(4, 1), process_group=odd)
        assert (grid.stage_id, grid.prev_stage_rank, grid.next_stage_rank) == (1, 1, 5)


# ----------------------------------------------------------------------- real ranks


def _core_on_real_ranks() -> dict[str, Any]:
    grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=2, num_dp=2))
    check_core(grid)
    check_names_agree(grid)
    # Pass a value down the pipeline with the neighbour ranks.
    received = None
    if grid.prev_stage_rank is not None:
        value = torch.zeros(1, dtype=torch.int64)
        dist.recv(value, src=grid.prev_stage_rank)
        received = int(value.item())
    if grid.next_stage_rank is not None:
        dist.send(torch.tensor([100 + grid.global_rank]), dst=grid.next_stage_rank)
    # One stage of four, where the pipe line and the replica are the default group (None).
    line = PipelineParallelGrid(ProcessTopology(["pipe", "data"], [4, 1]))
    check_core(line)
    check_names_agree(line)
    total = torch.tensor([dist.get_rank()])
    dist.all_reduce(total, group=line.axis_group("pipe"))
    return {
        "received": received,
        "pipe_is_none": line.axis_group("pipe") is None,
        "replica_is_none": line.replica_group() is None,
        "sum": int(total.item()),
    }


def test_core_and_names_agree_on_four_real_ranks() -> None:
    results = spawn_ranks(_core_on_real_ranks, 4, timeout=_TIMEOUT_S)
    for rank, got in enumerate(results):
        assert got["received"] == (None if rank < 2 else 100 + rank - 2)
        assert got["pipe_is_none"]
        assert got["replica_is_none"]
        assert got["sum"] == 0 + 1 + 2 + 3
