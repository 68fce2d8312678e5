"""pipetopo.testing: the multi-rank harness and the simulated world."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipetopo import PipeDataParallelTopology, PipelineParallelGrid
from pipetopo.testing import (
    RankFailedError,
    fake_world,
    run_torchrun,
    spawn_ranks,
    torchrun_command,
    world_of_one,
)


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
    with pytest.raises(TimeoutError, match=r"ranks \[1\] of 2 had not finished after 15.0 s"):
        spawn_ranks(_hang_on_rank_one, 2, str(pid_file), timeout=15.0)
    assert time.monotonic() - started < 30
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


def test_the_torchrun_command_is_standalone_and_redirects_only_with_a_log_dir() -> None:
    plain = torchrun_command("job.py", 3, ["--steps", "2"], python="py")
    assert plain == [
        "py",
        *("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"),
        *("job.py", "--steps", "2"),
    ]
    logged = torchrun_command(Path("job.py"), 2, log_dir=Path("logs"))
    assert logged[0] == sys.executable
    assert logged[-5:] == ["--log-dir", "logs", "--redirects", "1", "job.py"]
    assert not any("master" in part for part in plain + logged)
    with pytest.raises(ValueError, match="nproc"):
        torchrun_command("job.py", 0)


def test_run_torchrun_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nproc"):
        run_torchrun("job.py", True, timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        run_torchrun("job.py", 2, timeout=0)
    with pytest.raises(ValueError, match="stop_grace"):
        run_torchrun("job.py", 2, timeout=1, stop_grace=-1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited: only its parent's wait is pending, and the
    parent of an orphan here, pid 1, may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.fixture
def pid_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder where a job records the pids it wants checked; whatever of them a failing test
    leaves running is killed, so one failure does not leak processes into the session."""
    folder = tmp_path / "pids"
    folder.mkdir()
    yield folder
    for path in folder.glob("*.pid"):
        pid = int(path.read_text())
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _recorded_pids(folder: Path) -> dict[str, int]:
    return {path.stem: int(path.read_text()) for path in sorted(folder.glob("*.pid"))}


# Rank 1 ignores SIGTERM and sleeps; rank 0 waits for it in a gloo collective whose timeout is
# an hour, and has a helper child in a session of its own. torchrun's SIGTERM stops rank 0
# only, and no process group holds more than one of the three. Everything the kill depends on
# is set up before torch is imported, so the test holds even on a machine too loaded for the
# ranks to reach the collective within the timeout.
HANGING_JOB = """
import os, signal, subprocess, sys, time
from pathlib import Path

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
if rank == 1:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    helper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    (out / "helper.pid").write_text(str(helper.pid))
(out / f"rank{rank}.pid").write_text(str(os.getpid()))

from datetime import timedelta
import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(hours=1))
(out / f"rank{rank}.hanging").touch()
if rank == 1:
    while True:
        time.sleep(60)
dist.all_reduce(torch.ones(1))
"""


def test_a_hanging_torchrun_job_is_killed_whole_within_its_timeout(
    tmp_path: Path, pid_dir: Path
) -> None:
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(HANGING_JOB))
    timeout, grace = 20.0, 2.0
    started = time.monotonic()
    result = run_torchrun(script, 2, [str(pid_dir)], timeout=timeout, stop_grace=grace)
    elapsed = time.monotonic() - started
    # Normally both ranks are in their hang when the timeout comes; named in failure messages.
    hanging = sorted(path.stem for path in pid_dir.glob("*.hanging"))
    assert result.timed_out, (hanging, result)
    assert elapsed < timeout + grace + 5, (hanging, result)
    pids = _recorded_pids(pid_dir)
    assert sorted(pids) == ["helper", "rank0", "rank1"], (hanging, result)
    survivors = {name: pid for name, pid in pids.items() if _running(pid)}
    assert not survivors, f"still running after run_torchrun returned: {survivors}\n{result}"
    # rank 1 ignored SIGTERM, so only the SIGKILL step can have stopped it.
    assert pids["rank1"] in result.killed, (hanging, result)


# Rank 0 starts a child in a session of its own and exits: torchrun ends cleanly, and the
# child is an orphan that no process group or parent chain links to the job any more.
ORPHANING_JOB = """
import os, subprocess, sys
from pathlib import Path

if os.environ["RANK"] == "0":
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    (Path(sys.argv[1]) / "orphan.pid").write_text(str(child.pid))
print("rank", os.environ["RANK"], "done")
"""


def test_a_process_of_the_job_that_outlives_torchrun_is_killed(
    tmp_path: Path, pid_dir: Path
) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(textwrap.dedent(ORPHANING_JOB))
    result = run_torchrun(script, 2, [str(pid_dir)], timeout=60, per_rank_stdout=True)
    assert (result.returncode, result.timed_out) == (0, False), result
    assert result.rank_stdout == ("rank 0 done\n", "rank 1 done\n")
    orphan = _recorded_pids(pid_dir)["orphan"]
    assert not _running(orphan), result
    assert result.killed == (orphan,)
