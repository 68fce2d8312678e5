"""Launch scripts under ``torchrun`` from pytest: bounded, killable, and at most once per session.

* `torchrun` runs ``python -m torch.distributed.run --standalone --nproc-per-node N script``
  with ``OMP_NUM_THREADS=1`` and a timeout; on a timeout (or any interruption, e.g.
  pytest-timeout) it kills the whole process group, so no worker outlives the test. Each
  rank's stdout goes to its own file (``--redirects``) and comes back in rank order: ranks
  writing to one shared pipe tear each other's lines.
* `LaunchCache` makes a launch happen once per pytest session even under pytest-xdist, where
  every worker process would otherwise run its own copy of a module-scoped fixture: the first
  worker to ask launches while holding a file lock, the others wait for it and read its result.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest

__all__ = ["LaunchCache", "LaunchResult", "shared_session_dir", "torchrun"]


@dataclass(frozen=True)
class LaunchResult:
    """How one ``torchrun`` launch ended."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def report(self, limit: int = 6000) -> str:
        """The command, exit status and output tails, for an assertion message."""
        status = "timed out" if self.timed_out else f"exit status {self.returncode}"
        return (
            f"$ {' '.join(self.command)}\n{status} after {self.seconds:.1f} s\n"
            f"--- stderr (last {limit} chars) ---\n{self.stderr[-limit:]}\n"
            f"--- stdout (last {limit // 3} chars) ---\n{self.stdout[-limit // 3 :]}"
        )


def torchrun(
    script: Path,
    nproc: int,
    args: Sequence[str] = (),
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> LaunchResult:
    """Run ``script`` on ``nproc`` local ranks; never raises for the script's own failures.

    ``stdout`` of the result is every rank's stdout, whole, rank 0 first; ``stderr`` is
    torchrun's and the ranks' stderr as they wrote it.
    """
    with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as log_dir:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "--log-dir",
            log_dir,
            "--redirects",
            "1",  # stdout only: stderr stays live for tracebacks and timeouts
            str(script),
            *args,
        ]
        result = _launch(command, timeout=timeout, env=env, cwd=cwd)
        return _with_rank_stdout(result, Path(log_dir), nproc)


def _with_rank_stdout(result: LaunchResult, log_dir: Path, nproc: int) -> LaunchResult:
    """``result`` with the ranks' stdout files, in rank order, after torchrun's own stdout."""
    parts = [result.stdout]
    for rank in range(nproc):
        parts.extend(
            path.read_text() for path in sorted(log_dir.glob(f"*/attempt_*/{rank}/stdout.log"))
        )
    return replace(result, stdout="".join(parts))


def _launch(
    command: list[str], *, timeout: float, env: dict[str, str] | None, cwd: Path | None
) -> LaunchResult:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.monotonic()
    # A new session makes torchrun the leader of a process group holding all its workers: a
    # timeout kills the group, where killing torchrun alone would orphan workers stuck in a
    # collective.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process)
        stdout, stderr = process.communicate()
    finally:
        if process.poll() is None:  # interrupted (e.g. by pytest-timeout) before it ended
            _kill_group(process)
            process.wait()
    return LaunchResult(
        command=command,
        returncode=process.returncode,
        stdout=stdout,
        stderr=stderr,
        seconds=round(time.monotonic() - start, 2),
        timed_out=timed_out,
    )


def _kill_group(process: subprocess.Popen[str]) -> None:
    with suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)


def shared_session_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder that every xdist worker of this pytest session sees (one per session)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    directory = base / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class LaunchCache:
    """Results of launches keyed by name, computed once per session across xdist workers.

    ``get(key, launch)`` returns the result stored under ``key``, or calls ``launch(folder)``
    (``folder`` is the launch's own empty folder, for its output files) and stores the result.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, launch: Callable[[Path], LaunchResult]) -> LaunchResult:
        record = self.root / f"{key}.json"
        with _locked(self.root / f"{key}.lock"):
            if record.exists():
                return LaunchResult(**json.loads(record.read_text()))
            folder = self.folder(key)
            folder.mkdir(parents=True, exist_ok=True)
            result = launch(folder)
            record.write_text(json.dumps(asdict(result)))
            return result


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
