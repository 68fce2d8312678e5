"""PipelineParallelGrid on simulated worlds (torch's fake process group, no real processes)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed as dist

from pipetopo import (
    PipeDataParallelTopology,
    PipelineParallelGrid,
    PipeModelDataParallelTopology,
    ProcessTopology,
)
from pipetopo.testing import fake_world


@pytest.fixture
def new_group_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], bool]]:
    """Records every torch.distributed.new_group call: (ranks, use_local_synchronization)."""
    calls: list[tuple[list[int], bool]] = []
    real: Callable[..., Any] = dist.new_group

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append((list(kwargs["ranks"]), bool(kwargs.get("use_local_synchronization"))))
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "new_group", recording)
    return calls


def _members(group: dist.ProcessGroup) -> list[int]:
    return list(dist.get_process_group_ranks(group))


# ------------------------------------------------------------ validation before collectives


def test_grid_without_process_group_says_to_initialise() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        PipelineParallelGrid(PipeDataParallelTopology(2, 2))


def test_size_mismatch_raises_before_any_group_is_created(
    new_group_calls: list[tuple[list[int], bool]],
) -> None:
    with fake_world(8, rank=3), pytest.raises(ValueError, match="process group") as caught:
        PipelineParallelGrid(PipeDataParallelTopology(num_pp=2, num_dp=2))
    message = str(caught.value)
    assert "4 ranks" in message
    assert "has 8" in message
    assert "multiply to 8" in message
    assert new_group_calls == []


def test_grid_needs_pipe_and_data_axes(new_group_calls: list[tuple[list[int], bool]]) -> None:
    with fake_world(4, rank=0), pytest.raises(ValueError, match=r"\['data'\]"):
        PipelineParallelGrid(ProcessTopology(["pipe", "model"], [2, 2]))
    assert new_group_calls == []


def test_grid_rejects_wrong_argument_types() -> None:
    with fake_world(4, rank=0):
        with pytest.raises(TypeError, match="ProcessTopology"):
            PipelineParallelGrid([2, 2])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ProcessGroup"):
            PipelineParallelGrid(process_group="world")  # type: ignore[arg-type]


def test_group_for_checks_ranks_before_creating_groups(
    new_group_calls: list[tuple[list[int], bool]],
) -> None:
    with fake_world(8, rank=0):
        grid = PipelineParallelGrid(PipeDataParallelTopology(4, 2))
        before = len(new_group_calls)
        with pytest.raises(ValueError, match="rank 8 is out of range"):
            grid.group_for([0, 8])
        with pytest.raises(ValueError, match="no ranks"):
            grid.group_for([])
        with pytest.raises(TypeError, match="sequence"):
            grid.group_for(3)  # type: ignore[arg-type]
        assert len(new_group_calls) == before


# ------------------------------------------------------------------- DeepSpeed semantics


def test_stage_to_global_on_each_rank_of_a_2x2_grid() -> None:
    topo = ProcessTopology(axes=["pipe", "data"], dims=[2, 2])
    for rank in range(4):
        with fake_world(4, rank):
            grid = PipelineParallelGrid(topology=topo)
            assert grid.stage_to_global(stage_id=0, data=0) == 0
            assert grid.stage_to_global(stage_id=0, data=1) == 1
            assert grid.stage_to_global(stage_id=1, data=0) == 2
            assert grid.stage_to_global(stage_id=1, data=1) == 3
            same_replica = [0, 2] if topo.get_coord(rank).data == 0 else [1, 3]
            assert [grid.stage_to_global(s) for s in (0, 1)] == same_replica
            assert grid.is_first_stage == (grid.get_stage_id() == 0)
            assert grid.is_last_stage == (grid.get_stage_id() == 1)
            with pytest.raises(ValueError, match="pipe=2 is out of range"):
                grid.stage_to_global(2)
            with pytest.raises(ValueError, match="stage_id"):
                grid.stage_to_global(0, pipe=1)
            with pytest.raises(ValueError, match="'model'"):
                grid.stage_to_global(0, model=0)


def test_default_topology_splits_prime_factors_alternately() -> None:
    with fake_world(12, rank=5):
        grid = PipelineParallelGrid()
        assert grid.topology() == PipeDataParallelTopology(num_pp=6, num_dp=2)
        assert (grid.stage_id, grid.data_parallel_id) == (2, 1)


def test_p2p_groups_pair_each_rank_with_the_next_stage_wrapping_around() -> None:
    with fake_world(8, rank=0):
        grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=4, num_dp=2))
        assert grid.p2p_groups == [[0, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7], [6, 0], [7, 1]]


def test_sizes_and_ranks_of_a_3d_grid() -> None:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    rank = topo.get_rank(pipe=1, data=2, model=1)
    with fake_world(12, rank):
        grid = PipelineParallelGrid(topo)
        assert (grid.global_rank, grid.get_global_rank(), grid.world_size) == (rank, rank, 12)
        assert (grid.pipe_parallel_size, grid.data_parallel_size) == (2, 3)
        # DeepSpeed's two meanings of "model parallel": the model axis, and pipe x model.
        assert grid.model_parallel_size == grid.slice_parallel_size == 2
        assert grid.get_model_parallel_world_size() == 4
        assert grid.get_model_parallel_rank() == 3
        assert _members(grid.get_model_parallel_group()) == topo.filter_match(data=2)
        assert grid.get_slice_parallel_rank() == grid.get_tensor_model_parallel_rank() == 1
        assert grid.get_slice_parallel_world_size() == 2
        assert grid.get_tensor_model_parallel_world_size() == 2
        assert grid.get_tensor_model_parallel_group() is grid.get_slice_parallel_group()
        assert grid.get_pipeline_model_parallel_group() is grid.get_pipe_parallel_group()
        assert grid.get_pipe_parallel_rank() == grid.get_pipeline_model_parallel_rank() == 1
        assert grid.get_data_parallel_rank() == grid.get_data_parallel_id() == 2
        assert grid.get_data_parallel_group_ranks() == grid.dp_group == [7, 9, 11]
        assert grid.pp_group == [5, 11]
        assert grid.get_axis_group_ranks("model") == [10, 11]
        assert grid.coord == topo.get_coord(rank)
        assert grid.topology_rank == rank
        assert "coord=ProcessCoord(pipe=1, data=2, model=1)" in repr(grid)


def test_without_model_axis_slices_are_single_ranks() -> None:
    with fake_world(4, rank=2):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        assert grid.get_slice_parallel_rank() == 0
        assert grid.get_slice_parallel_world_size() == 1
        assert _members(grid.get_slice_parallel_group()) == [2]
        assert grid.model_parallel_size == 1


def test_no_single_rank_group_per_rank_without_model_axis(
    new_group_calls: list[tuple[list[int], bool]],
) -> None:
    # DeepSpeed makes every rank create all 4,096 one-rank slice groups here.
    with fake_world(4096, rank=77):
        grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=16, num_dp=256))
    collective = [ranks for ranks, local in new_group_calls if not local]
    local = [ranks for ranks, local in new_group_calls if local]
    # 256 pipe lines + 16 data lines; the model-parallel groups equal the pipe lines.
    assert len(collective) == 256 + 16 == grid.group_creation_calls
    assert local == [[77]]


# ------------------------------------------------------------------------- group_for


def test_group_for_is_cached_by_sorted_unique_ranks(
    new_group_calls: list[tuple[list[int], bool]],
) -> None:
    with fake_world(8, rank=3):
        grid = PipelineParallelGrid(PipeDataParallelTopology(4, 2))
        before = len(new_group_calls)
        tie = grid.group_for([7, 3])
        assert tie is not None
        assert _members(tie) == [3, 7]
        assert grid.group_for([3, 7, 7]) is tie
        assert len(new_group_calls) == before + 1
        assert grid.group_for([0, 6]) is None  # not a member, but the call was made
        assert len(new_group_calls) == before + 2
        assert grid.group_for(range(8)) is grid.process_group
        assert grid.group_for(grid.topology().get_axis_comm_lists("pipe")[1]) is (
            grid.get_pipe_parallel_group()
        )
        assert len(new_group_calls) == before + 2


def test_group_for_a_single_rank_needs_no_collective(
    new_group_calls: list[tuple[list[int], bool]],
) -> None:
    with fake_world(8, rank=3):
        grid = PipelineParallelGrid(PipeModelDataParallelTopology(2, 2, 2))
        before = len(new_group_calls)
        assert grid.group_for([5]) is None
        alone = grid.group_for([3])
        assert alone is not None
        assert _members(alone) == [3]
        assert new_group_calls[before:] == [([3], True)]


# ------------------------------------------------------------------ simulated 4,096 ranks


def _expected_lines(rank: int) -> dict[str, list[int]]:
    """Pipe 16 x data 64 x model 4, written out without the topology's arithmetic."""

    def coord(r: int) -> tuple[int, int, int]:
        return r // 256, (r // 4) % 64, r % 4

    pipe, data, model = coord(rank)
    world = range(4096)
    return {
        "pipe": [r for r in world if coord(r)[1:] == (data, model)],
        "data": [r for r in world if (coord(r)[0], coord(r)[2]) == (pipe, model)],
        "model": [r for r in world if coord(r)[:2] == (pipe, data)],
        "model_parallel": [r for r in world if coord(r)[1] == data],
    }


@pytest.mark.parametrize("rank", [0, 3, 1234, 2047, 4095, *random.Random(7).sample(range(4096), 3)])
def test_4096_rank_grid_membership(rank: int) -> None:
    topo = PipeModelDataParallelTopology(num_pp=16, num_mp=4, num_dp=64)
    expected = _expected_lines(rank)
    with fake_world(4096, rank):
        grid = PipelineParallelGrid(topo)
        groups = {
            "pipe": grid.get_pipe_parallel_group(),
            "data": grid.get_data_parallel_group(),
            "model": grid.get_slice_parallel_group(),
            "model_parallel": grid.get_model_parallel_group(),
        }
        for name, group in groups.items():
            assert _members(group) == expected[name], name
        assert dist.get_rank(groups["pipe"]) == grid.stage_id == rank // 256
        assert dist.get_rank(groups["data"]) == grid.get_data_parallel_rank()
        assert dist.get_rank(groups["model"]) == grid.get_slice_parallel_rank() == rank % 4
        assert dist.get_rank(groups["model_parallel"]) == grid.get_model_parallel_rank()
        assert grid.get_model_parallel_world_size() == 64
        assert grid.is_first_stage == (rank < 256)
        assert grid.is_last_stage == (rank >= 15 * 256)
        assert grid.stage_to_global(15) == expected["pipe"][15]
        assert grid.p2p_groups[rank] == [rank, expected["pipe"][(rank // 256 + 1) % 16]]
        # Lines of every axis plus one model-parallel group per replica, nothing per rank.
        assert grid.group_creation_calls == 256 + 64 + 1024 + 64


def test_grid_on_a_sub_group_of_a_simulated_world() -> None:
    with fake_world(8, rank=5):
        odd = dist.new_group([1, 3, 5, 7])
        dist.new_group([0, 2, 4, 6])
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2), process_group=odd)
        assert grid.process_group is odd
        assert (grid.topology_rank, grid.global_rank) == (2, 5)
        assert (grid.stage_id, grid.data_parallel_id) == (1, 0)
        assert [grid.to_global_rank(r) for r in range(4)] == [1, 3, 5, 7]
        assert grid.to_topology_rank(7) == 3
        with pytest.raises(ValueError, match="global rank 2 is not in"):
            grid.to_topology_rank(2)
        assert grid.stage_to_global(0) == 1
        assert grid.pp_group == [1, 5]
        assert grid.dp_group == [5, 7]
        assert _members(grid.get_pipe_parallel_group()) == [1, 5]
        assert _members(grid.get_data_parallel_group()) == [5, 7]
        assert grid.p2p_groups == [[1, 5], [3, 7], [5, 1], [7, 3]]
        tie = grid.group_for([0, 2])
        assert tie is not None
        assert _members(tie) == [1, 5]


def test_grid_on_a_process_group_without_this_rank_is_refused() -> None:
    with fake_world(4, rank=3):
        theirs = dist.new_group([0, 1])  # torch hands non-members a sentinel, not a group
        with pytest.raises(RuntimeError, match="not a member"):
            PipelineParallelGrid(PipeDataParallelTopology(2, 1), process_group=theirs)


def test_grid_on_an_uneven_sub_group() -> None:
    with fake_world(4, rank=2):
        mine = dist.new_group([0, 1, 2])
        grid = PipelineParallelGrid(PipeDataParallelTopology(3, 1), process_group=mine)
        assert (grid.stage_id, grid.is_last_stage, grid.world_size) == (2, True, 3)
        assert grid.stage_to_global(0) == 0


def test_to_device_mesh_reuses_the_grid_groups() -> None:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    with fake_world(8, rank=6):
        grid = PipelineParallelGrid(topo)
        mesh = grid.to_device_mesh("cpu")
        assert mesh.mesh_dim_names == ("pipe", "data", "model")
        assert mesh.mesh.tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
        assert mesh.get_group("pipe") is grid.get_pipe_parallel_group()
        assert mesh.get_group("model") is grid.get_slice_parallel_group()
        assert tuple(mesh.get_coordinate() or ()) == tuple(topo.get_coord(6))


# ---------------------------------------------------------- DeepSpeed's attribute names


def test_deepspeed_attributes_of_a_3d_grid() -> None:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    rank = topo.get_rank(pipe=1, data=2, model=1)  # 11
    with fake_world(12, rank):
        grid = PipelineParallelGrid(topo)
        assert grid._topo is topo
        assert grid._is_grid_valid()
        assert grid.pp_proc_group is grid.get_pipe_parallel_group()
        assert grid.dp_proc_group is grid.get_data_parallel_group()
        assert grid.slice_proc_group is grid.get_slice_parallel_group()
        assert grid.ds_model_proc_group is grid.get_model_parallel_group()
        assert _members(grid.pp_proc_group) == [5, 11]
        assert _members(grid.dp_proc_group) == [7, 9, 11]
        assert _members(grid.slice_proc_group) == grid.slice_group == [10, 11]
        # pipe x model ranks of replica 2: 4, 5, 10, 11; this rank is the fourth.
        assert _members(grid.ds_model_proc_group) == [4, 5, 10, 11]
        assert (grid.ds_model_rank, grid.ds_model_world_size) == (3, 4)
        assert grid.pipe_groups == [[0, 6], [1, 7], [2, 8], [3, 9], [4, 10], [5, 11]]
        assert grid.dp_groups == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
        assert grid.pp_group in grid.pipe_groups
        assert grid.dp_group in grid.dp_groups


def test_deepspeed_rank_lists_are_fresh_copies() -> None:
    with fake_world(4, rank=1):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        grid.dp_groups[0].append(99)
        grid.pipe_groups.clear()
        grid.slice_group.append(99)
        assert grid.dp_groups == [[0, 1], [2, 3]]
        assert grid.pipe_groups == [[0, 2], [1, 3]]
        assert grid.slice_group == [1]


def test_deepspeed_attributes_are_read_only() -> None:
    with fake_world(4, rank=0):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        with pytest.raises(AttributeError):
            grid.dp_groups = []  # type: ignore[misc]
        with pytest.raises(AttributeError):
            grid._topo = PipeDataParallelTopology(4, 1)  # type: ignore[misc]


def test_deepspeed_attributes_without_a_model_axis() -> None:
    with fake_world(4, rank=2):
        grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=2, num_dp=2))
        assert grid.slice_group == [2]
        assert _members(grid.slice_proc_group) == [2]
        # Without a model axis a replica's model-parallel ranks are its pipeline.
        assert grid.ds_model_proc_group is grid.pp_proc_group
        assert (grid.ds_model_rank, grid.ds_model_world_size) == (1, 2)


def test_deepspeed_rank_lists_are_global_ranks_on_a_sub_group() -> None:
    with fake_world(8, rank=5):
        odd = dist.new_group([1, 3, 5, 7])
        dist.new_group([0, 2, 4, 6])
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2), process_group=odd)
        assert grid._is_grid_valid()  # against the grid's group (4), not the world (8)
        assert grid.pipe_groups == [[1, 5], [3, 7]]
        assert grid.dp_groups == [[1, 3], [5, 7]]
        assert grid.slice_group == [5]
        assert _members(grid.ds_model_proc_group) == [1, 5]
        assert grid.ds_model_rank == 1


def test_deepspeed_grid_on_16384_simulated_ranks() -> None:
    topo = PipeModelDataParallelTopology(num_pp=16, num_mp=4, num_dp=256)
    rank = 9000  # pipe 8, data 202, model 0
    with fake_world(16384, rank):
        grid = PipelineParallelGrid(topo)
        assert grid._is_grid_valid()
        pipe_groups, dp_groups = grid.pipe_groups, grid.dp_groups
        assert (len(pipe_groups), len(dp_groups)) == (256 * 4, 16 * 4)
        assert sorted(r for group in pipe_groups for r in group) == list(range(16384))
        assert sorted(r for group in dp_groups for r in group) == list(range(16384))
        assert grid.pp_group in pipe_groups
        assert grid.dp_group in dp_groups
        assert grid.slice_group == [9000, 9001, 9002, 9003]
        assert grid.ds_model_world_size == 64
        assert grid.ds_model_rank == 8 * 4 + 0


def test_grid_used_after_destroy_process_group_says_so() -> None:
    with fake_world(4, rank=1):
        grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=4, num_dp=1))
        assert grid.get_pipe_parallel_group() is dist.group.WORLD
    with pytest.raises(RuntimeError, match=r"destroy_process_group\(\) was called"):
        grid.get_pipe_parallel_group()
