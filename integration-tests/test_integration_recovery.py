"""Surviving a killed rank: tools/demo.py --fail-at-step under torchrun --max-restarts.

A rank SIGKILLs itself in the middle of a step; torchrun restarts the workers, which resume
from the last checkpoint and end with the final loss of the run that was never interrupted.
Without a restart, the surviving ranks exit on their own, well within the process group's
timeout, with gloo's error about the lost connection.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipetopo.testing import run_torchrun, torchrun_command

DEMO = Path(__file__).resolve().parents[1] / "tools" / "demo.py"
SMALL = ["--sentences", "400", "--hidden", "32", "--depth", "2", "--batch-size", "16"]
RESUMABLE = [*SMALL, "--steps", "60", "--log-every", "30", "--checkpoint-every", "20"]
FINAL_LOSS = re.compile(r"final loss +(\S+) \(step 60\)")


def _demo(*args: str, timeout: float = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(DEMO), *args, "--timeout", str(timeout - 20)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def _final_loss(output: str) -> float:
    found = FINAL_LOSS.findall(output)
    assert len(found) == 1, output
    return float(found[0])


def test_a_killed_rank_is_restarted_and_training_ends_as_if_uninterrupted() -> None:
    uninterrupted = _demo(*RESUMABLE)
    assert "restart" not in uninterrupted
    assert "fault injection" not in uninterrupted

    faulted = _demo(*RESUMABLE, "--fail-at-step", "30")
    assert "demo: fault injection: rank 3 kills itself (SIGKILL) in step 30" in faulted
    assert "restart 1: torchrun started the 4 workers again" in faulted
    assert "resumed from" in faulted
    assert "step_00000020" in faulted
    assert "faults injected  1: rank 3 killed (SIGKILL) in the middle of step 30" in faulted
    assert "steps lost       9 finished steps (21..29) and the interrupted step 30" in faulted
    assert re.search(r"time to recover  \d+\.\d s from the kill", faulted), faulted
    assert "[PASS] training survived the killed rank: 1 restart(s)" in faulted
    assert "[FAIL]" not in faulted
    # Same layout, same batches, RNG and optimizer state restored: the same bits.
    assert _final_loss(faulted) == _final_loss(uninterrupted)


def test_survivors_of_a_killed_rank_exit_on_their_own_within_the_timeout(tmp_path: Path) -> None:
    # A monitor interval longer than the run keeps torchrun from stopping the survivors itself:
    # they must notice the lost peer and exit without it.
    pg_timeout = 20
    result = run_torchrun(
        DEMO,
        4,
        [
            *SMALL,
            *("--steps", "12", "--checkpoint-every", "5", "--fail-at-step", "8"),
            *("--resume-dir", str(tmp_path), "--pg-timeout", str(pg_timeout)),
        ],
        timeout=120,
        env={"PYTHONUNBUFFERED": "1"},
        extra_torchrun_args=["--monitor-interval", "15"],
    )
    assert not result.timed_out, result.stderr[-4000:]
    assert result.returncode != 0, result.stderr[-4000:]
    assert "rank 3 kills itself (SIGKILL) in step 8" in result.stderr
    exits = dict(
        re.findall(r"demo: rank (\d) exits (\S+) s after rank 3 was killed", result.stderr)
    )
    assert sorted(exits) == ["0", "1", "2"], result.stderr[-4000:]
    assert all(float(seconds) < pg_timeout for seconds in exits.values()), exits
    # gloo names the lost connection (an address, not a rank).
    assert re.search(r"step 8 failed .*Connection (reset|closed) by peer", result.stderr)


def test_extra_torchrun_arguments_go_before_the_script() -> None:
    command = torchrun_command("job.py", 2, ["--x"], python="py", extra_torchrun_args=["--a", "1"])
    assert command[-4:] == ["--a", "1", "job.py", "--x"]
    with pytest.raises(TypeError, match="sequence of strings"):
        torchrun_command("job.py", 2, extra_torchrun_args="--max-restarts")
