"""pipetopo.testing: the multi-rank harness and the simulated world."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipetopo import PipeDataParallelTopology, PipelineParallelGrid
from pipetopo.testing import RankFailedError, fake_world, spawn_ranks, world_of_one


def _rank_report(offset: int) -> tuple[int, int, int, str | None]:
    value = torch.ones(1)
    dist.all_reduce(value)
    return (
        dist.get_rank() + offset,
        dist.get_world_size(),
        int(value.item()),
        os.getenv("OMP_NUM_THREADS"),
    )


def test_results_come_back_in_rank_order() -> None:
    results = spawn_ranks(_rank_report, 3, 100, timeout=60.0)
    assert results == [(100, 3, 3, "1"), (101, 3, 3, "1"), (102, 3, 3, "1")]


def _rank_tensor() -> torch.Tensor:
    return torch.full((2, 3), float(dist.get_rank()))


def test_tensors_come_back_after_their_rank_has_exited() -> None:
    first, second = spawn_ranks(_rank_tensor, 2, timeout=60.0)
    assert torch.equal(first, torch.zeros(2, 3))
    assert torch.equal(second, torch.ones(2, 3))


def _fail_on_rank_one() -> str:
    if dist.get_rank() == 1:
        raise KeyError("no such layer: 'lm_head'")
    return "fine"


def test_an_exception_in_one_rank_is_raised_with_its_traceback() -> None:
    with pytest.raises(RankFailedError) as caught:
        spawn_ranks(_fail_on_rank_one, 2, timeout=60.0)
    message = str(caught.value)
    assert "1 of 2 ranks failed" in message
    assert "--- rank 1 ---" in message
    assert "Traceback (most recent call last)" in message
    assert "in _fail_on_rank_one" in message
    assert "KeyError: \"no such layer: 'lm_head'\"" in message
    assert list(caught.value.failures) == [1]


def _hang_on_rank_one(pid_file: str) -> None:
    if dist.get_rank() == 1:
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(600)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_rank_past_the_timeout_is_killed_and_named(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] of 2 had not finished after 8.0 s"):
        spawn_ranks(_hang_on_rank_one, 2, str(pid_file), timeout=8.0)
    assert time.monotonic() - started < 20
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), f"rank 1 (pid {pid}) is still alive"


def _exit_abruptly() -> None:
    if dist.get_rank() == 0:
        os._exit(7)


def test_a_rank_that_dies_without_reporting_is_a_failure() -> None:
    with pytest.raises(RankFailedError, match="exited with code 7"):
        spawn_ranks(_exit_abruptly, 2, timeout=60.0)


def test_functions_children_cannot_import_are_refused_up_front() -> None:
    def local_function() -> None:
        return None

    with pytest.raises(TypeError, match="module-level function"):
        spawn_ranks(local_function, 2)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="world_size"):
        spawn_ranks(_fail_on_rank_one, 0)
    with pytest.raises(ValueError, match="timeout"):
        spawn_ranks(_fail_on_rank_one, 2, timeout=0)


def test_fake_world_initialises_and_always_destroys() -> None:
    with fake_world(1024, rank=17) as world:
        assert dist.get_rank() == 17
        assert dist.get_world_size() == world.size() == 1024
        with pytest.raises(RuntimeError, match="destroy_process_group"), fake_world(2, rank=0):
            pass
    assert not dist.is_initialized()
    with pytest.raises(ZeroDivisionError), fake_world(4, rank=1):
        _ = 1 / 0
    assert not dist.is_initialized()


def test_fake_world_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError, match=r"\[0, 4\)"), fake_world(4, rank=4):
        pass
    with pytest.raises(ValueError, match="world_size"), fake_world(0, rank=0):
        pass


def test_world_of_one_runs_real_collectives() -> None:
    with world_of_one() as world:
        assert (dist.get_rank(), world.size(), dist.get_backend()) == (0, 1, "gloo")
        value = torch.tensor([5.0])
        dist.all_reduce(value)
        assert value.item() == 5.0
        grid = PipelineParallelGrid()
        assert grid.topology() == PipeDataParallelTopology(num_pp=1, num_dp=1)
        assert grid.is_first_stage
        assert grid.is_last_stage
        assert grid.get_data_parallel_group() is world
        with pytest.raises(RuntimeError, match="destroy_process_group"), world_of_one():
            pass
    assert not dist.is_initialized()
