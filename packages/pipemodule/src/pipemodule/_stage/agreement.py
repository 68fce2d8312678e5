"""Cross-rank agreement on what is being built, before anything is built or any group created.

Each rank checks its arguments and computes its layout locally, then the ranks exchange, in one
collective, either the layout's fingerprint or the error the local step raised. So a mistake made
on some ranks only (a bad regex, a memory limit, a constructor argument) raises on every rank at
once, naming the failing rank, and ranks that disagree raise, naming the first difference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from pipemodule._layout import ConstructionFingerprint, first_difference
from pipemodule._stage.collective import (
    PipelineRankError,
    failure_report,
    gather_objects,
    global_rank,
    raise_failures,
)

__all__ = ["agree_on_construction"]

T = TypeVar("T")

_WHAT = "checking the PipelineModule arguments and computing the layout"


def agree_on_construction(
    prepare: Callable[[], tuple[ConstructionFingerprint, T]],
    seed: int,
    group: dist.ProcessGroup | None,
) -> tuple[T, int]:
    """Run the local ``prepare`` step, then check every rank of ``group`` agrees on its result.

    Returns ``prepare``'s value and rank 0's ``seed``. Collective over ``group``, one
    all-gather, which every rank enters whether or not its step raised:

    * a step that raised on some ranks raises on every rank: the failing ranks re-raise their
      own error (``TypeError``, ``ValueError``), the others a `PipelineRankError` naming the
      failing ranks and their messages;
    * fingerprints that differ raise the same `PipelineRankError` on every rank, naming the
      first rank that differs from rank 0 and the first difference.
    """
    error: BaseException | None = None
    fingerprint: ConstructionFingerprint | None = None
    value: T | None = None
    try:
        fingerprint, value = prepare()
    except Exception as caught:  # every rank is told below, in the one agreement collective
        error = caught
    report = None if error is None else failure_report(error)
    gathered = gather_objects((fingerprint, report, seed), group, _WHAT)
    raise_failures(_WHAT, [entry[1] for entry in gathered], error, group)
    reference, _, reference_seed = gathered[0]
    for index, (other, _, _) in enumerate(gathered):
        if other != reference and other is not None and reference is not None:
            raise PipelineRankError(
                f"ranks disagree about the pipeline to build: rank {global_rank(group, index)} vs "
                f"rank {global_rank(group, 0)}: {first_difference(other, reference)}. Every rank "
                f"must construct PipelineModule with the same layers, topology, partition method "
                f"and seeding (same code and arguments; no rank-dependent values)"
            )
    if value is None:  # pragma: no cover - prepare returned, so raise_failures saw no error
        raise RuntimeError("the construction step returned no value")
    return value, int(reference_seed)
