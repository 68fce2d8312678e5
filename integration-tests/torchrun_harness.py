"""Launch scripts under ``torchrun`` from pytest: bounded, killable, and at most once per session.

* `torchrun` runs ``python -m torch.distributed.run --standalone --nproc-per-node N script``
  through `pipetopo.testing.run_torchrun`, with ``OMP_NUM_THREADS=1`` and a timeout. On a
  timeout (or any interruption, e.g. pytest-timeout) torchrun is stopped and every worker
  still alive is killed with its process group, so no worker outlives the test. Each rank's
  stdout goes to its own file (``--redirects``) and comes back in rank order: ranks writing to
  one shared pipe tear each other's lines.
* `LaunchCache` makes a launch happen once per pytest session even under pytest-xdist, where
  every worker process would otherwise run its own copy of a module-scoped fixture: the first
  worker to ask launches while holding a file lock, the others wait for it and read its result.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from pipetopo.testing import run_torchrun

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
    # Unbuffered, so a rank's output up to a hang or a kill is in the report.
    child_env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = run_torchrun(
        script, nproc, args, timeout=timeout, per_rank_stdout=True, env=child_env, cwd=cwd
    )
    return LaunchResult(
        command=result.command,
        returncode=result.returncode,
        stdout=result.stdout + "".join(result.rank_stdout),
        stderr=result.stderr,
        seconds=result.seconds,
        timed_out=result.timed_out,
    )


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
