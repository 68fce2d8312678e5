"""The catalogue of user mistakes for pipetopo, and the group leak of repeated grids.

One test per case, so a regression in any message or type fails CI (see the README's "What goes
wrong, and what you see"). Multi-rank cases run real gloo ranks with a short timeout.
"""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from pipetopo import (
    PipeDataParallelTopology,
    PipelineParallelGrid,
    ProcessTopology,
    WrongTypeError,
)
from pipetopo.testing import fake_world, spawn_ranks, world_of_one


def test_process_group_of_wrong_type() -> None:
    with fake_world(4, rank=0), pytest.raises(WrongTypeError, match=r"must be a torch.distributed"):
        PipelineParallelGrid(process_group="world")  # type: ignore[arg-type]


def test_process_group_this_rank_is_not_in() -> None:
    with fake_world(4, rank=3), pytest.raises(RuntimeError, match=r"is not a member"):
        PipelineParallelGrid(process_group=dist.GroupMember.NON_GROUP_MEMBER)  # type: ignore[arg-type]


def test_topology_of_another_size() -> None:
    with fake_world(4, rank=0), pytest.raises(ValueError, match=r"8"):
        PipelineParallelGrid(PipeDataParallelTopology(4, 2))


def test_topology_of_wrong_type() -> None:
    with fake_world(4, rank=0), pytest.raises(WrongTypeError, match=r"ProcessTopology or None"):
        PipelineParallelGrid(topology=[2, 2])  # type: ignore[arg-type]


def test_unknown_axis_names_the_axes() -> None:
    with fake_world(4, rank=0):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        with pytest.raises(ValueError, match=r"no axis 'tensor'; its axes are"):
            grid.axis_group("tensor")


def test_group_for_without_ranks() -> None:
    with fake_world(4, rank=0):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        with pytest.raises(ValueError, match=r"got no ranks"):
            grid.group_for([])


def test_group_for_a_rank_outside_the_topology() -> None:
    with fake_world(4, rank=0):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        with pytest.raises(ValueError, match=r"7"):
            grid.group_for([0, 7])


def test_group_of_on_a_non_member() -> None:
    with fake_world(4, rank=0):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        with pytest.raises(ValueError, match=r"do not include this rank"):
            grid.group_of([1, 3])


def test_topology_with_a_bad_dimension() -> None:
    with pytest.raises(ValueError, match=r"positive"):
        ProcessTopology(axes=["pipe", "data"], dims=[2, 0])


def test_a_closed_grid_refuses_to_hand_out_groups() -> None:
    with world_of_one():
        grid = PipelineParallelGrid(PipeDataParallelTopology(1, 1))
        grid.close()
        grid.close()  # twice is fine
        assert grid.closed
        with pytest.raises(RuntimeError, match=r"grid was closed"):
            grid.axis_group("pipe")


def test_a_second_grid_reuses_the_groups_of_the_first() -> None:
    with fake_world(8, rank=5):
        first = PipelineParallelGrid(PipeDataParallelTopology(2, 4))
        tie = first.group_for([1, 5])
        second = PipelineParallelGrid(PipeDataParallelTopology(2, 4))
        assert first.group_creation_calls > 0
        assert second.group_creation_calls == second.local_group_creation_calls == 0
        assert second.get_pipe_parallel_group() is first.get_pipe_parallel_group()
        assert second.group_for([5, 1]) is tie
        assert second.group_creation_calls == 0


def test_closing_every_user_destroys_and_a_new_grid_creates_again() -> None:
    with fake_world(8, rank=5):
        with PipelineParallelGrid(PipeDataParallelTopology(2, 4)) as first:
            calls = first.group_creation_calls
            second = PipelineParallelGrid(PipeDataParallelTopology(2, 4))
        second.close()
        third = PipelineParallelGrid(PipeDataParallelTopology(2, 4))
        assert third.group_creation_calls == calls


def test_spawn_ranks_refuses_a_world_of_zero() -> None:
    with pytest.raises(ValueError, match=r"world_size must be a positive int"):
        spawn_ranks(os.getpid, 0)


def test_spawn_ranks_refuses_a_negative_timeout() -> None:
    with pytest.raises(ValueError, match=r"timeout must be a positive number"):
        spawn_ranks(os.getpid, 1, timeout=-1)


def _resources() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _repeated_grids(count: int) -> dict[str, object]:
    warm = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
    warm.group_for([0, 3])
    before = _resources()
    grids = [warm]
    for _ in range(count):
        grid = PipelineParallelGrid(PipeDataParallelTopology(2, 2))
        grid.group_for([0, 3])
        grids.append(grid)
    during = _resources()
    calls = [grid.group_creation_calls for grid in grids]
    for grid in grids:
        grid.close()
    return {"before": before, "during": during, "calls": calls, "after": _resources()}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_repeated_grids_add_no_groups_fds_or_threads() -> None:
    for result in spawn_ranks(_repeated_grids, 4, 3, timeout=90):
        before, during, after = result["before"], result["during"], result["after"]
        assert isinstance(before, tuple)
        assert isinstance(during, tuple)
        assert isinstance(after, tuple)
        calls = result["calls"]
        assert isinstance(calls, list)
        # The first grid creates its groups; the other three share every one of them.
        assert calls[0] > 0, calls
        assert set(calls[1:]) == {0}, calls
        # None added; one may close meanwhile (a transient socket of the rank's harness).
        assert during[0] <= before[0], (before, during)
        assert during[1] <= before[1], (before, during)
        assert after[0] < before[0], "closing the last grid frees the groups' descriptors"
