"""Launch a script under ``torchrun`` with a timeout, and leave no process of the job behind.

[Note: finding every process of a torchrun job]

Killing torchrun's process group is not enough: torch's elastic agent starts every worker with
``start_new_session=True``, so each worker leads a session and a process group of its own.
Killing torchrun alone is not enough either: a worker whose torchrun died is reparented, and
one blocked in a collective waits for a peer that will never come. So the launcher finds the
job's processes itself, from two records that cover each other's gaps:

* the processes whose parent chain leads to torchrun, read from ``/proc`` while torchrun is
  still alive and *before* it is signalled (its death reparents the workers, after which no
  chain leads back);
* the processes whose environment holds this launch's token (``PIPETOPO_TORCHRUN_JOB``). Every
  worker inherits it, and so does anything a worker starts. The token survives reparenting, so
  it finds orphans after torchrun has exited too.

Each process is recorded with its start time, so a pid that the kernel reuses for an unrelated
process is never signalled. A worker leads its own process group, and that group is killed
with it, which takes any child the worker forked without a session of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["TorchrunResult", "run_torchrun", "torchrun_command"]

_JOB_VARIABLE = "PIPETOPO_TORCHRUN_JOB"
# After a SIGKILL the kernel needs a moment to tear a process down; wait this long at most.
_KILL_WAIT_S = 5.0
_POLL_S = 0.05

# A process as the launcher records it: (pid, start time in clock ticks since boot).
_Member = tuple[int, int]


@dataclass(frozen=True)
class TorchrunResult:
    """How one `run_torchrun` launch ended.

    Attributes:
        command: the command line that was run.
        returncode: torchrun's exit status (negative: the signal that ended it).
        stdout: torchrun's own standard output: with ``per_rank_stdout`` usually empty, otherwise
            every rank's output as it arrived, interleaved. Empty when not captured.
        stderr: torchrun's and every rank's standard error as written. Empty when not captured.
        rank_stdout: with ``per_rank_stdout``, each rank's standard output, whole, indexed by
            rank; otherwise empty.
        seconds: wall time from the start until every process of the job was gone.
        timed_out: torchrun had not finished within the timeout and was stopped.
        killed: pids of the job's processes (torchrun's workers and whatever they started)
            that were still alive when torchrun ended or was stopped, and were killed with
            SIGKILL. Empty after a clean run.
    """

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    rank_stdout: tuple[str, ...]
    seconds: float
    timed_out: bool
    killed: tuple[int, ...]


def torchrun_command(
    script: str | os.PathLike[str],
    nproc: int,
    args: Sequence[str] = (),
    *,
    log_dir: str | os.PathLike[str] | None = None,
    python: str | None = None,
    extra_torchrun_args: Sequence[str] = (),
) -> list[str]:
    """The command line that runs ``script args...`` on ``nproc`` local ranks.

    ``python -m torch.distributed.run --standalone --nproc-per-node N``: a single-node
    rendezvous on a free port, so concurrent jobs do not clash (a fixed ``--master_port=0``
    without ``--standalone`` hangs instead). With ``log_dir``, each rank's stdout goes to its
    own file under it (``--redirects 1``) while stderr stays on torchrun's stderr. ``python``
    defaults to this interpreter. ``extra_torchrun_args`` go to torchrun itself, before the
    script: ``("--max-restarts", "2")`` restarts the workers up to twice when one fails.

    Raises:
        ValueError: ``nproc`` is not a positive int.
        TypeError: ``extra_torchrun_args`` is a string rather than a sequence of strings.
    """
    _check_nproc(nproc)
    extra = _check_torchrun_args(extra_torchrun_args)
    command = [python or sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(nproc)]
    if log_dir is not None:
        command += ["--log-dir", os.fspath(log_dir), "--redirects", "1"]
    return [*command, *extra, os.fspath(script), *args]


def run_torchrun(
    script: str | os.PathLike[str],
    nproc: int,
    args: Sequence[str] = (),
    *,
    timeout: float,
    per_rank_stdout: bool = False,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stop_grace: float = 5.0,
    extra_torchrun_args: Sequence[str] = (),
) -> TorchrunResult:
    """Run ``script args...`` under torchrun on ``nproc`` local ranks; return how it ended.

    Never raises for the job's own failures: a failing rank shows in ``returncode`` and a hang
    in ``timed_out``. The children see ``os.environ`` updated with ``env``, and
    ``OMP_NUM_THREADS=1`` unless either sets it.

    ``capture`` collects torchrun's stdout and stderr into the result; without it they go to
    this process's own. ``per_rank_stdout`` sends each rank's stdout to a file of its own (a
    temporary log folder) and returns them in ``rank_stdout``: ranks writing to one pipe tear
    each other's lines. ``extra_torchrun_args`` go to torchrun before the script (see
    `torchrun_command`); with ``("--max-restarts", "N")`` a restarted job's ``rank_stdout``
    holds each attempt's output in turn, and ``timeout`` covers every attempt.

    After ``timeout`` seconds, torchrun gets SIGTERM, on which it stops its workers. Whatever
    of the job is still alive ``stop_grace`` seconds later is killed with SIGKILL, each worker
    with its process group. After a normal exit, any process of the job that outlived torchrun
    is killed too. The same happens if this call is interrupted (KeyboardInterrupt, a pytest
    timeout). The job's processes are found through ``/proc`` (Linux; elsewhere only torchrun
    is signalled): see [Note: finding every process of a torchrun job].

    Raises:
        ValueError: ``nproc``, ``timeout`` or ``stop_grace`` is out of range.
        TypeError: ``extra_torchrun_args`` is a string rather than a sequence of strings.
    """
    _check_nproc(nproc)
    _check_torchrun_args(extra_torchrun_args)
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    if not stop_grace >= 0:
        raise ValueError(f"stop_grace must be a number of seconds >= 0, got {stop_grace!r}.")
    token = uuid.uuid4().hex
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env[_JOB_VARIABLE] = token
    with _log_folder(per_rank_stdout) as log_dir:
        command = torchrun_command(
            script, nproc, args, log_dir=log_dir, extra_torchrun_args=extra_torchrun_args
        )
        started = time.monotonic()
        pipe = subprocess.PIPE if capture else None
        # A session of its own keeps a terminal's Ctrl-C away from torchrun (this call stops
        # the job instead), and gives torchrun a process group that can be killed whole.
        process = subprocess.Popen(
            command, stdout=pipe, stderr=pipe, env=child_env, cwd=cwd, start_new_session=True
        )
        stdout, stderr = _Reader(process.stdout), _Reader(process.stderr)
        timed_out = False
        try:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            killed = _end_job(process, token, stop_grace)
            # The pipes close once every holder is gone; a holder that survived SIGKILL (in
            # uninterruptible sleep) must not block the caller.
            out, err = stdout.text(_KILL_WAIT_S), stderr.text(_KILL_WAIT_S)
        seconds = round(time.monotonic() - started, 2)
        ranks = _rank_stdout(Path(log_dir), nproc) if log_dir is not None else ()
    if process.returncode is None:  # pragma: no cover - only a process in uninterruptible sleep
        raise RuntimeError(f"torchrun (pid {process.pid}) survived SIGKILL; it cannot be reaped.")
    return TorchrunResult(
        command=command,
        returncode=process.returncode,
        stdout=out,
        stderr=err,
        rank_stdout=ranks,
        seconds=seconds,
        timed_out=timed_out,
        killed=killed,
    )


def _check_nproc(nproc: int) -> None:
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}.")


def _check_torchrun_args(extra: Sequence[str]) -> list[str]:
    # A lone string is a sequence too, and would become one argument per character.
    if isinstance(extra, (str, bytes)) or not all(isinstance(arg, str) for arg in extra):
        raise TypeError(
            f"extra_torchrun_args must be a sequence of strings, such as "
            f"('--max-restarts', '1'), got {extra!r}."
        )
    return list(extra)


@contextmanager
def _log_folder(wanted: bool) -> Iterator[str | None]:
    if not wanted:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="torchrun-logs-", ignore_cleanup_errors=True) as path:
        yield path


def _rank_stdout(log_dir: Path, nproc: int) -> tuple[str, ...]:
    """Each rank's stdout file (``<run id>/attempt_<n>/<rank>/stdout.log``), attempts in order."""
    return tuple(
        "".join(
            path.read_text(errors="replace")
            for path in sorted(log_dir.glob(f"*/attempt_*/{rank}/stdout.log"))
        )
        for rank in range(nproc)
    )


class _Reader:
    """Drains one pipe on a thread, so a full pipe never blocks the job and partial output is
    kept even if a surviving holder never closes it."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self._chunks: list[bytes] = []
        self._thread: threading.Thread | None = None
        if stream is not None:
            self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
            self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        with stream:
            # os.read returns what has arrived, where a buffered read would wait for a full chunk.
            while chunk := os.read(stream.fileno(), 65536):
                self._chunks.append(chunk)

    def text(self, timeout: float) -> str:
        if self._thread is not None:
            self._thread.join(timeout)
        return b"".join(list(self._chunks)).decode(errors="replace")


def _end_job(process: subprocess.Popen[bytes], token: str, grace: float) -> tuple[int, ...]:
    """Stop torchrun if it is running, then SIGKILL every process of its job still alive."""
    members: set[_Member] = set()
    if process.poll() is None:
        # Recorded before any signal: once torchrun dies its workers lose their parent chain.
        members = _job_members(token, process.pid, descendants=True)
        process.terminate()  # torchrun's handler stops its workers, SIGKILL after 30 s
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        if process.poll() is None:
            members |= _job_members(token, process.pid, descendants=True)
            # Still unreaped, so its pid (and group id) cannot belong to anyone else yet.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()
    # torchrun may be reaped by now: only the token can tell which orphans are the job's.
    members |= _job_members(token, process.pid, descendants=False)
    alive = [member for member in members if _state(member) not in (None, "Z", "X")]
    _kill(alive, {pid for pid, _ in members})
    if process.returncode is None:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=_KILL_WAIT_S)
    deadline = time.monotonic() + _KILL_WAIT_S
    while any(_state(member) not in (None, "Z", "X") for member in alive):
        if time.monotonic() > deadline:
            break
        time.sleep(_POLL_S)
    return tuple(sorted(pid for pid, _ in alive))


def _kill(members: list[_Member], job_pids: set[int]) -> None:
    """SIGKILL each member, and its process group where a process of the job leads it."""
    own_group = os.getpgrp()
    for pid, started in members:
        stat = _stat(pid)
        if stat is None or stat[3] != started:
            continue  # gone, and the pid perhaps reused
        group = stat[2]
        # A group led by someone outside the job may hold processes that are not the job's.
        if group in job_pids and group != own_group:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _job_members(token: str, torchrun: int, *, descendants: bool) -> set[_Member]:
    """The job's processes other than torchrun: those carrying ``token`` and, with
    ``descendants`` (only while torchrun is unreaped, so its pid is still its own), those
    whose parent chain leads to torchrun."""
    table = _process_table()
    members: set[_Member] = set()
    if descendants:
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = list(children.get(torchrun, []))
        while stack:
            pid = stack.pop()
            members.add((pid, table[pid][3]))
            stack.extend(children.get(pid, []))
    marker = f"{_JOB_VARIABLE}={token}".encode()
    for pid, (state, _, _, started) in table.items():
        if state in ("Z", "X") or (pid, started) in members or pid == torchrun:
            continue
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if marker in environment.split(b"\0"):
            members.add((pid, started))
    return members


def _process_table() -> dict[int, tuple[str, int, int, int]]:
    """Every process: pid -> (state, parent pid, process group, start time)."""
    table: dict[int, tuple[str, int, int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:  # not Linux: only torchrun itself can be signalled
        return table
    for entry in entries:
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, process group, start time) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may itself hold spaces and parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _state(member: _Member) -> str | None:
    """The member's state letter ("Z": a zombie), or None if it is gone."""
    stat = _stat(member[0])
    return stat[0] if stat is not None and stat[3] == member[1] else None
