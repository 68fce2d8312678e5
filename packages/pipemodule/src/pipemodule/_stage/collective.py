"""Collective helpers that turn one rank's failure into an error on every rank, not a hang."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import TypeVar, cast

import torch.distributed as dist

__all__ = ["PipelineRankError", "gather_objects", "global_rank", "run_on_every_rank"]

T = TypeVar("T")


class PipelineRankError(RuntimeError):
    """Raised on every rank when a step failed on some rank of a collective operation."""


def gather_objects(value: T, group: dist.ProcessGroup | None) -> list[T]:
    """All-gather one picklable value per rank of ``group`` (collective over ``group``)."""
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return cast("list[T]", gathered)


def run_on_every_rank(what: str, step: Callable[[], T], group: dist.ProcessGroup | None) -> T:
    """Run a local ``step`` on every rank of ``group``, then agree on whether it worked.

    A step that raises on one rank while its peers go on into the next collective would leave
    those peers waiting forever. Instead, every rank reports its outcome, and if any rank failed,
    every rank raises: a failing rank re-raises its own exception, with a note naming the other
    failures if there were any, and the others raise a ``PipelineRankError`` that quotes every
    failure. Collective over ``group``.
    """
    error: BaseException | None = None
    result: T | None = None
    try:
        result = step()
    except Exception as caught:  # reported to every rank below
        error = caught
    report = None if error is None else "".join(traceback.format_exception_only(error)).strip()
    reports = gather_objects(report, group)
    failures = [
        (global_rank(group, index), text) for index, text in enumerate(reports) if text is not None
    ]
    if failures:
        summary = "; ".join(f"rank {rank}: {text}" for rank, text in failures)
        if error is not None:
            if len(failures) > 1 and hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"{what} failed on {len(failures)} rank(s): {summary}")
            raise error
        raise PipelineRankError(f"{what} failed on {len(failures)} rank(s): {summary}")
    return cast(T, result)


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of rank ``group_rank`` of ``group`` (None: the default group)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
