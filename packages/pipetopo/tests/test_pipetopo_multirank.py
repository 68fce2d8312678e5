"""PipelineParallelGrid with real ranks: gloo process groups between local processes."""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

from pipetopo import (
    PipeDataParallelTopology,
    PipelineParallelGrid,
    PipeModelDataParallelTopology,
    ProcessTopology,
)
from pipetopo.testing import spawn_ranks

_TIMEOUT_S = 90.0


def _sum_of_ranks(group: dist.ProcessGroup) -> int:
    """All-reduce this process's global rank over ``group``: the sum of its members' ranks."""
    value = torch.tensor([dist.get_rank()], dtype=torch.int64)
    dist.all_reduce(value, group=group)
    return int(value.item())


def _pass_along_pipeline(grid: PipelineParallelGrid) -> int | None:
    """Stage 0 sends rank * 10 to stage 1 through `stage_to_global`; stage 1 returns it."""
    if grid.stage_id == 0:
        dist.send(torch.tensor([dist.get_rank() * 10]), dst=grid.stage_to_global(1))
        return None
    received = torch.zeros(1, dtype=torch.int64)
    dist.recv(received, src=grid.stage_to_global(0))
    return int(received.item())


# ---------------------------------------------------------------------- pipe 2 x data 2


def _grid_2x2() -> dict[str, Any]:
    grid = PipelineParallelGrid(ProcessTopology(axes=["pipe", "data"], dims=[2, 2]))
    tie = grid.group_for([3, 0])
    mesh = grid.to_device_mesh("cpu")
    return {
        "pipe": _sum_of_ranks(grid.get_pipe_parallel_group()),
        "pp_group": grid.pp_group,
        "data": _sum_of_ranks(grid.get_data_parallel_group()),
        "dp_group": grid.get_data_parallel_group_ranks(),
        "model_parallel": _sum_of_ranks(grid.get_model_parallel_group()),
        "slice": _sum_of_ranks(grid.get_slice_parallel_group()),
        "tie": None if tie is None else _sum_of_ranks(tie),
        "tie_cached": grid.group_for([0, 3, 3]) is tie,
        "mesh_data": _sum_of_ranks(mesh.get_group("data")),
        "mesh": mesh.mesh.tolist(),
        "first": grid.is_first_stage,
        "last": grid.is_last_stage,
        "stages": [grid.stage_to_global(s, data=d) for s in range(2) for d in range(2)],
        "same_replica": [grid.stage_to_global(s) for s in range(2)],
        "received": _pass_along_pipeline(grid),
        # DeepSpeed's attribute spellings reach the same groups.
        "ds_pipe": _sum_of_ranks(grid.pp_proc_group),
        "ds_data": _sum_of_ranks(grid.dp_proc_group),
        "ds_model": _sum_of_ranks(grid.ds_model_proc_group),
        "ds_slice": _sum_of_ranks(grid.slice_proc_group),
        "slice_group": grid.slice_group,
        "valid": grid._is_grid_valid(),
        "coords": _gathered_coords(grid),
        "coord": grid.coord,  # pickled back to the test process by spawn_ranks
    }


def _gathered_coords(grid: PipelineParallelGrid) -> list[Any]:
    """Every rank's coordinate, gathered as pickled objects."""
    coords: list[Any] = [None] * grid.world_size
    dist.all_gather_object(coords, grid.coord)
    return coords


def test_groups_of_a_2x2_grid_reduce_over_exactly_their_ranks() -> None:
    results = spawn_ranks(_grid_2x2, 4, timeout=_TIMEOUT_S)
    for rank, got in enumerate(results):
        stage, replica = divmod(rank, 2)
        pipe_line = [replica, replica + 2]
        assert got["pipe"] == sum(pipe_line) == sum(got["pp_group"])
        assert got["pp_group"] == pipe_line
        assert got["data"] == sum(got["dp_group"])
        assert got["dp_group"] == [2 * stage, 2 * stage + 1]
        assert got["model_parallel"] == sum(pipe_line)  # pipe x model, no model axis
        assert got["slice"] == rank
        assert got["tie"] == (3 if rank in (0, 3) else None)
        assert got["tie_cached"]
        assert got["mesh_data"] == sum(got["dp_group"])
        assert got["mesh"] == [[0, 1], [2, 3]]
        assert (got["first"], got["last"]) == (stage == 0, stage == 1)
        assert got["stages"] == [0, 1, 2, 3]
        assert got["same_replica"] == pipe_line
        assert got["received"] == (None if stage == 0 else 10 * replica)
        assert (got["ds_pipe"], got["ds_data"]) == (got["pipe"], got["data"])
        assert got["ds_model"] == got["model_parallel"]
        assert got["ds_slice"] == rank
        assert got["slice_group"] == [rank]
        assert got["valid"]
        topo = ProcessTopology(axes=["pipe", "data"], dims=[2, 2])
        assert got["coord"] == topo.ProcessCoord(pipe=stage, data=replica)
        assert type(got["coord"]) is topo.ProcessCoord
        assert got["coords"] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert [c.pipe for c in got["coords"]] == [0, 0, 1, 1]


# ------------------------------------------------------------- pipe 2 x data 1 x model 2


def _grid_3d() -> dict[str, Any]:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1)
    grid = PipelineParallelGrid(topo)
    mesh = topo.to_device_mesh("cpu")
    default_grid = PipelineParallelGrid()
    return {
        "pipe": _sum_of_ranks(grid.get_pipe_parallel_group()),
        "data": _sum_of_ranks(grid.get_data_parallel_group()),
        "slice": _sum_of_ranks(grid.get_slice_parallel_group()),
        "model_parallel": _sum_of_ranks(grid.get_model_parallel_group()),
        "mesh_model": _sum_of_ranks(mesh.get_group("model")),
        "mesh_pipe": _sum_of_ranks(mesh.get_group("pipe")),
        "default_pipe": _sum_of_ranks(default_grid.get_pipe_parallel_group()),
        "default_topology": default_grid.topology(),
        "received": _pass_along_pipeline(grid),
    }


def test_groups_of_a_3d_grid_with_a_unit_data_axis() -> None:
    results = spawn_ranks(_grid_3d, 4, timeout=_TIMEOUT_S)
    for rank, got in enumerate(results):
        stage, model = divmod(rank, 2)
        assert got["pipe"] == got["mesh_pipe"] == model + (model + 2)
        assert got["data"] == rank  # a data axis of size 1: each rank alone
        assert got["slice"] == got["mesh_model"] == 2 * stage + (2 * stage + 1)
        assert got["model_parallel"] == 0 + 1 + 2 + 3
        assert got["default_topology"] == PipeDataParallelTopology(num_pp=2, num_dp=2)
        assert got["default_pipe"] == (rank % 2) + (rank % 2 + 2)
        assert got["received"] == (None if stage == 0 else 10 * model)


# --------------------------------------------------- a grid living inside a sub-group


def _grid_on_ranks_1_to_4() -> dict[str, Any]:
    inner = dist.new_group([1, 2, 3, 4])
    got: dict[str, Any] = {}
    if dist.get_rank() != 0:
        grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=2, num_dp=2), inner)
        tie = grid.group_for([0, 3])  # topology ranks: global 1 and 4
        mesh = grid.to_device_mesh("cpu")
        got = {
            "topology_rank": grid.topology_rank,
            "global_rank": grid.get_global_rank(),
            "in_group": grid.process_group is inner,
            "pipe": _sum_of_ranks(grid.get_pipe_parallel_group()),
            "pp_group": grid.pp_group,
            "data": _sum_of_ranks(grid.get_data_parallel_group()),
            "dp_group": grid.dp_group,
            "tie": None if tie is None else _sum_of_ranks(tie),
            "mesh": mesh.mesh.tolist(),
            "mesh_pipe": _sum_of_ranks(mesh.get_group("pipe")),
            "received": _pass_along_pipeline(grid),
        }
    got["world"] = _sum_of_ranks(dist.group.WORLD)  # type: ignore[arg-type]
    return got


def test_grid_honours_its_process_group() -> None:
    results = spawn_ranks(_grid_on_ranks_1_to_4, 5, timeout=_TIMEOUT_S)
    assert results[0] == {"world": 0 + 1 + 2 + 3 + 4}
    for rank, got in enumerate(results[1:], start=1):
        stage, replica = divmod(rank - 1, 2)
        pipe_line = [1 + replica, 3 + replica]
        assert (got["topology_rank"], got["global_rank"]) == (rank - 1, rank)
        assert got["in_group"]
        assert got["pp_group"] == pipe_line
        assert got["pipe"] == got["mesh_pipe"] == sum(pipe_line)
        assert got["dp_group"] == [1 + 2 * stage, 2 + 2 * stage]
        assert got["data"] == sum(got["dp_group"])
        assert got["tie"] == (1 + 4 if rank in (1, 4) else None)
        assert got["mesh"] == [[1, 2], [3, 4]]
        assert got["received"] == (None if stage == 0 else 10 * (1 + replica))
        assert got["world"] == 10


# ---------------------------------------------------------------------- teardown


def _default_group_references_held_by_a_grid() -> tuple[int, bool]:
    """References to the default group a live 2-stage grid holds, and the groups it hands out."""
    world = dist.group.WORLD
    before = sys.getrefcount(world)
    grid = PipelineParallelGrid(PipeDataParallelTopology(num_pp=2, num_dp=1))
    handed_out = (grid.process_group, grid.get_pipe_parallel_group(), grid.group_for([0, 1]))
    all_default = all(group is world for group in handed_out)
    del handed_out
    return sys.getrefcount(world) - before, all_default


def test_a_live_grid_does_not_keep_the_default_group_alive() -> None:
    # A grid still referenced when a script calls destroy_process_group() must not keep the
    # default group's backend alive until interpreter shutdown, where gloo aborts the process.
    for held, all_default in spawn_ranks(_default_group_references_held_by_a_grid, 2):
        assert all_default, "the grid's whole-world groups are the default group"
        assert held == 0
