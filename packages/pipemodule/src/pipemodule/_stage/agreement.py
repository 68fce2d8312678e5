"""Cross-rank agreement on what is being built, before anything is built or any group created.

Each rank summarises its layout as a fingerprint; the ranks exchange fingerprints, and every rank
raises the same error, naming the first difference, if any two disagree.
"""

from __future__ import annotations

import torch.distributed as dist

from pipemodule._layout import ConstructionFingerprint, first_difference
from pipemodule._stage.collective import gather_objects, global_rank

__all__ = ["agree_on_construction"]


def agree_on_construction(
    fingerprint: ConstructionFingerprint, seed: int, group: dist.ProcessGroup | None
) -> int:
    """Check that every rank of ``group`` has the same fingerprint; return rank 0's ``seed``.

    Collective over ``group``: every rank must call it. On a mismatch every rank raises the same
    ``RuntimeError``, which names the first rank that differs from rank 0 and the first
    difference, so no rank goes on to build a stage its peers do not expect.
    """
    gathered: list[tuple[ConstructionFingerprint, int]] = gather_objects((fingerprint, seed), group)
    reference, reference_seed = gathered[0]
    for index, (other, _) in enumerate(gathered):
        if other != reference:
            raise RuntimeError(
                f"ranks disagree about the pipeline to build: rank {global_rank(group, index)} vs "
                f"rank {global_rank(group, 0)}: {first_difference(other, reference)}. Every rank "
                f"must construct PipelineModule with the same layers, topology and partition "
                f"method (same code and arguments; no rank-dependent values)"
            )
    return int(reference_seed)
