"""Run multi-rank code in tests: real ranks as local processes, or one rank of a simulated world.

A public submodule, like ``torch.testing``. Importing it imports ``torch.distributed`` (as
importing ``pipetopo`` does).

* `spawn_ranks` starts ``world_size`` processes joined by a real process group (gloo by default),
  runs a function on each and returns what every rank returned. It never hangs: a failure in
  any rank is raised in the caller with that rank's traceback, and a rank that overruns the
  timeout has every process killed.
* `fake_world` makes the current process one rank of a large simulated world (torch's fake
  process group: groups are created, nothing is sent), for scale tests and benchmarks.
* `world_of_one` makes the current process a real job of one rank, for single-rank tests of
  code that calls collectives.
* `run_torchrun` runs a script under ``torchrun`` with a timeout, and leaves no worker behind
  whether the job ends, fails or hangs; `torchrun_command` is its command line.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

# Public classes of torch.distributed; torch imports the stores there without ``as``, which
# mypy --strict does not count as a re-export.
from torch.distributed import (  # type: ignore[attr-defined]
    HashStore,
    ProcessGroup,
    Store,
    TCPStore,
)
from torch.testing._internal.distributed.fake_pg import FakeStore

from pipetopo._torchrun import TorchrunResult, run_torchrun, torchrun_command

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

__all__ = [
    "RankFailedError",
    "TorchrunResult",
    "fake_world",
    "run_torchrun",
    "spawn_ranks",
    "torchrun_command",
    "world_of_one",
]

T = TypeVar("T")

_HOST = "127.0.0.1"
# After one rank fails, the others get this long to finish or fail on their own (a peer blocked
# in a collective with the failed rank usually errors out quickly) before they are killed.
_FAILURE_GRACE_S = 5.0
_STOP_GRACE_S = 3.0
# fake_world and world_of_one have no peer to wait for, but code under test that blocks anyway
# should fail within minutes, not after torch's default of 30.
_GROUP_TIMEOUT = timedelta(minutes=5)


class RankFailedError(RuntimeError):
    """One or more ranks of `spawn_ranks` raised or died.

    Attributes:
        failures: for each failing rank, its formatted traceback (or how it died).
    """

    def __init__(self, failures: Mapping[int, str], world_size: int, stopped: list[int]) -> None:
        self.failures = dict(sorted(failures.items()))
        parts = [
            f"{len(self.failures)} of {world_size} ranks failed "
            f"(ranks {sorted(self.failures)}); tracebacks follow."
        ]
        if stopped:
            parts.append(f"Ranks {stopped}, still running after the failure, were killed.")
        for rank, report in self.failures.items():
            parts.append(f"\n--- rank {rank} ---\n{report.rstrip()}")
        super().__init__("\n".join(parts))


def spawn_ranks(
    fn: Callable[..., T],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
) -> list[T]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes joined by a process group.

    Each rank is a ``forkserver`` process with ``OMP_NUM_THREADS=1`` that initialises the
    default process group (``backend``, rendezvous through a `torch.distributed.TCPStore` that
    this process serves on a free port, so concurrent calls, e.g. under pytest-xdist, do not
    clash), calls ``fn(*args)``, sends back its result and destroys the group. With NCCL each
    rank first selects GPU ``rank % device_count``.

    ``fn`` must be importable by the children (a module-level function) and ``args`` and the
    results picklable.

    Returns:
        The results, indexed by rank.

    Raises:
        RankFailedError: a rank raised or died; the message has every failing rank's traceback.
        TimeoutError: some rank had not finished after ``timeout`` seconds (counted from the
            start, process start-up included); every rank was killed.
        TypeError: ``fn`` or ``args`` cannot be sent to a child process.
        ValueError: ``world_size`` or ``timeout`` is not positive.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    try:
        pickle.dumps((fn, args))
    except Exception as error:
        raise TypeError(
            f"spawn_ranks() cannot send {fn!r} and its arguments to the rank processes ({error}); "
            "pass a module-level function and picklable arguments."
        ) from error

    store = TCPStore(_HOST, 0, is_master=True, wait_for_workers=False)
    context = multiprocessing.get_context("forkserver")
    processes: list[BaseProcess] = []
    receivers: list[Connection] = []
    try:
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_run_rank,
                args=(fn, args, rank, world_size, store.port, backend, timeout, sender),
                name=f"pipetopo-rank-{rank}",
            )
            process.start()
            sender.close()  # the child holds the only write end, so EOF means it is gone
            processes.append(process)
            receivers.append(receiver)
        return _collect(processes, receivers, timeout)
    finally:
        _stop(processes)
        for receiver in receivers:
            receiver.close()
        del store


def _collect(processes: list[BaseProcess], receivers: list[Connection], timeout: float) -> list[T]:
    world_size = len(processes)
    deadline = time.monotonic() + timeout
    results: dict[int, T] = {}
    failures: dict[int, str] = {}
    pending = set(range(world_size))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        handles: list[Any] = [receivers[r] for r in pending]
        handles += [processes[r].sentinel for r in pending]
        ready = set(wait(handles, timeout=remaining))
        for rank in sorted(pending):
            receiver, process = receivers[rank], processes[rank]
            if receiver not in ready and process.sentinel not in ready:
                continue
            pending.discard(rank)
            report = _receive(receiver, process)
            if report[0] == "ok":
                results[rank] = report[1]
            else:
                failures[rank] = report[1]
        if failures:
            deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
    still_running = sorted(pending)
    if failures:
        raise RankFailedError(failures, world_size, still_running)
    if still_running:
        raise TimeoutError(
            f"ranks {still_running} of {world_size} had not finished after {timeout} s; every "
            "rank process was stopped. Raise spawn_ranks(timeout=...) if the work is slow, or "
            "look for a collective that only some ranks enter."
        )
    return [results[rank] for rank in range(world_size)]


def _receive(receiver: Connection, process: BaseProcess) -> tuple[str, Any]:
    """A rank's report: ("ok", result) or ("error", text)."""
    try:
        if receiver.poll():
            report: tuple[str, Any] = pickle.loads(receiver.recv_bytes())
            return report
    except (EOFError, OSError):
        pass
    process.join(timeout=_STOP_GRACE_S)
    return (
        "error",
        f"the process exited with code {process.exitcode} without reporting a result "
        "(killed, crashed, or called os._exit).",
    )


def _stop(processes: list[BaseProcess]) -> None:
    """Terminate, then kill, every child still alive, and reap them all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
        process.close()


def _run_rank(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    sender: Connection,
) -> None:
    """The body of one rank process."""
    # torch is already imported here, so the variable no longer sizes its thread pool
    # (set_num_threads does); it is for fn and for any process fn starts.
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        torch.set_num_threads(1)
        if "nccl" in backend and torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        limit = timedelta(seconds=timeout)
        store = TCPStore(_HOST, port, is_master=False, timeout=limit)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=limit
        )
        # A rank that returns at once could otherwise close its connections while a peer is
        # still completing the backend's handshake, failing that peer's init_process_group.
        store.set(f"pipetopo/initialised/{rank}", "1")
        store.wait([f"pipetopo/initialised/{r}" for r in range(world_size)])
        try:
            report: tuple[str, Any] = ("ok", fn(*args))
        finally:
            dist.destroy_process_group()
    except BaseException:
        report = ("error", traceback.format_exc())
    # Plain pickle copies tensors into the message; the multiprocessing pickler would share
    # their storage through file descriptors that die with this process before the parent reads.
    try:
        sender.send_bytes(pickle.dumps(report))
    except Exception:
        failure = ("error", f"its result could not be sent back:\n{traceback.format_exc()}")
        sender.send_bytes(pickle.dumps(failure))
    finally:
        sender.close()


@contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[ProcessGroup]:
    """Make this process ``rank`` of a simulated world of ``world_size`` ranks.

    Initialises the default process group with torch's fake backend (groups and collectives
    succeed locally, nothing is communicated) and destroys it on exit. Yields the default group.

    >>> from pipetopo import PipelineParallelGrid, PipeModelDataParallelTopology
    >>> with fake_world(4096, rank=1234):
    ...     grid = PipelineParallelGrid(PipeModelDataParallelTopology(16, 4, 64))
    ...     grid.stage_id
    4

    Raises:
        RuntimeError: a default process group already exists.
        ValueError: ``world_size`` is not positive or ``rank`` is outside ``[0, world_size)``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}.")
    with _default_group("fake_world", "fake", FakeStore(), rank, world_size) as world:
        yield world


@contextmanager
def world_of_one(backend: str = "gloo") -> Iterator[ProcessGroup]:
    """Make this process a real job of one rank (rank 0 of 1) until the block ends.

    Initialises the default process group with ``backend`` and an in-process store, so
    collectives really run (trivially, over one rank); destroys it on exit. Yields the default
    group.

    Raises:
        RuntimeError: a default process group already exists.
    """
    with _default_group("world_of_one", backend, HashStore(), 0, 1) as world:
        yield world


@contextmanager
def _default_group(
    caller: str, backend: str, store: Store, rank: int, world_size: int
) -> Iterator[ProcessGroup]:
    """The default process group for the block, destroyed on exit whatever happens."""
    if dist.is_initialized():
        raise RuntimeError(
            f"{caller}() needs a process without a default process group; call "
            "torch.distributed.destroy_process_group() first."
        )
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=_GROUP_TIMEOUT
    )
    try:
        world = dist.group.WORLD
        if world is None:  # pragma: no cover - init_process_group just set it
            raise RuntimeError(f"the {backend} process group was not registered as the default.")
        yield world
    finally:
        dist.destroy_process_group()
