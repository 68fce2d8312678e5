"""Collective helpers that turn one rank's failure into an error on every rank, not a hang."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist

__all__ = [
    "ENTRY_TIMEOUT_VARIABLE",
    "PipelineRankError",
    "any_rank",
    "entry_timeout",
    "failure_report",
    "gather_objects",
    "global_rank",
    "group_ranks",
    "raise_failures",
    "require_every_rank",
    "run_on_every_rank",
]

T = TypeVar("T")

ENTRY_TIMEOUT_VARIABLE = "PIPEMODULE_ENTRY_TIMEOUT_S"
"""Seconds a collective method waits for every rank to enter it (default 120)."""
_DEFAULT_ENTRY_TIMEOUT_S = 120.0


class PipelineRankError(RuntimeError):
    """Raised on every rank when a step failed on some rank of a collective operation."""


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of ``group`` (None: the default group), for messages."""
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def _lost_peer(
    error: RuntimeError, group: dist.ProcessGroup | None, what: str
) -> PipelineRankError:
    return PipelineRankError(
        f"{what or 'a collective step'} lost contact with a peer: global rank "
        f"{dist.get_rank()} of the group of global ranks {group_ranks(group)} got "
        f"{str(error).strip().splitlines()[0]!r}. Another rank of the group died, was "
        f"killed or stalled past the process group's timeout; its own log names its error "
        f"(a stalled rank is waited for init_process_group(timeout=...), 30 minutes by "
        f"default: set a shorter one to be told sooner)"
    )


def gather_objects(value: T, group: dist.ProcessGroup | None, what: str = "") -> list[T]:
    """All-gather one picklable value per rank of ``group`` (collective over ``group``).

    A peer that died or was killed makes the backend raise with a socket address (gloo's
    "Connection closed by peer [127.0.0.1]:port"); that becomes a `PipelineRankError` that
    names the group's ranks and what to look at.
    """
    gathered: list[object] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(gathered, value, group=group)
    except RuntimeError as error:
        raise _lost_peer(error, group, what) from error
    return cast("list[T]", gathered)


def any_rank(
    flag: bool, group: dist.ProcessGroup | None, device: torch.device, what: str = ""
) -> bool:
    """Whether ``flag`` is true on some rank of ``group`` (collective over ``group``).

    One 1-element all-reduce on ``device`` (which the group's backend must accept): much
    cheaper than :func:`gather_objects`, which pickles and sends twice. A lost peer raises
    `PipelineRankError` as there.
    """
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    try:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as error:
        raise _lost_peer(error, group, what) from error
    return bool(value.item())


def failure_report(error: BaseException) -> str:
    """One line naming an exception's type and message, as other ranks are shown it."""
    return "".join(traceback.format_exception_only(error)).strip()


def raise_failures(
    what: str,
    reports: list[str | None],
    error: BaseException | None,
    group: dist.ProcessGroup | None,
) -> None:
    """Raise on every rank if any rank's report is an error; return if none is.

    A failing rank re-raises its own exception (its type says what went wrong: ``TypeError``,
    ``ValueError``), with a note naming the other failures if there were any; the others raise
    a `PipelineRankError` that names every failing rank and quotes its message.
    """
    failures = [
        (global_rank(group, index), text) for index, text in enumerate(reports) if text is not None
    ]
    if not failures:
        return
    summary = "; ".join(f"rank {rank}: {text}" for rank, text in failures)
    if error is not None:
        if len(failures) > 1 and hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"{what} failed on {len(failures)} rank(s): {summary}")
        raise error
    raise PipelineRankError(
        f"{what} failed on {len(failures)} rank(s): {summary}. This rank stopped too; fix the "
        f"failing rank's error and run again"
    )


def run_on_every_rank(what: str, step: Callable[[], T], group: dist.ProcessGroup | None) -> T:
    """Run a local ``step`` on every rank of ``group``, then agree on whether it worked.

    A step that raises on one rank while its peers go on into the next collective would leave
    those peers waiting forever. Instead, every rank reports its outcome, and if any rank failed,
    every rank raises (see `raise_failures`). Collective over ``group``.
    """
    error: BaseException | None = None
    result: T | None = None
    try:
        result = step()
    except Exception as caught:  # reported to every rank below
        error = caught
    report = None if error is None else failure_report(error)
    raise_failures(what, gather_objects(report, group, what), error, group)
    return cast(T, result)


def entry_timeout() -> float:
    """Seconds a collective method waits for every rank to enter it (`ENTRY_TIMEOUT_VARIABLE`)."""
    text = os.environ.get(ENTRY_TIMEOUT_VARIABLE)
    if text is None:
        return _DEFAULT_ENTRY_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"{ENTRY_TIMEOUT_VARIABLE}={text!r} is not a positive number of seconds; set it to "
            f"e.g. 300, or unset it for the default of {_DEFAULT_ENTRY_TIMEOUT_S:g}"
        )
    return seconds


def require_every_rank(what: str, group: dist.ProcessGroup | None) -> None:
    """Wait at most `entry_timeout` seconds for every rank of ``group`` to enter ``what``.

    Single-process code teaches ``if rank == 0: model.save_state_dict(d)``; in a collective
    method that leaves the caller waiting for peers that never come, for the whole process
    group timeout. A monitored barrier with a short timeout turns that into an error naming the
    missing ranks. Only gloo has one; other backends go on unchecked.
    """
    if dist.get_world_size(group) == 1 or dist.get_backend(group) != "gloo":
        return
    seconds = entry_timeout()
    try:
        dist.monitored_barrier(group, timeout=timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as error:
        raise PipelineRankError(
            f"{what} is collective over the pipeline's process group (global ranks "
            f"{group_ranks(group)}), but not every rank entered it within {seconds:g} s "
            f"({str(error).strip().splitlines()[0]}). Call it on every rank, not under "
            f"`if rank == 0:` (only the first data-parallel replica writes files anyway); if "
            f"ranks are just slow to arrive, set {ENTRY_TIMEOUT_VARIABLE} to more seconds"
        ) from error


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of rank ``group_rank`` of ``group`` (None: the default group)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
