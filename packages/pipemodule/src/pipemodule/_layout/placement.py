"""Which pipe rank holds which stage when every rank holds several (virtual) stages."""

from __future__ import annotations

from dataclasses import dataclass

from pipemodule._checks import positive_int

__all__ = ["PLACEMENTS", "StagePlacement"]

PLACEMENTS = ("loop", "v")
"""'loop': rank r holds r, r + P, r + 2P ... (Megatron's interleaving); 'v' (2 per rank): rank r
holds r and 2P - 1 - r, so the first and last stage (embedding and LM head) share a rank."""


@dataclass(frozen=True)
class StagePlacement:
    """``stages_per_rank`` stages on each of ``pipe_ranks`` ranks, placed by ``kind``."""

    kind: str
    pipe_ranks: int
    stages_per_rank: int

    @classmethod
    def of(cls, kind: object, pipe_ranks: int, stages_per_rank: object) -> StagePlacement:
        """A checked placement: ``kind`` one of :data:`PLACEMENTS`."""
        per_rank = positive_int("stages_per_rank", stages_per_rank)
        if not isinstance(kind, str):
            raise TypeError(
                f"stage_placement={kind!r} is a {type(kind).__name__}; pass 'loop' or 'v'"
            )
        if kind not in PLACEMENTS:
            raise ValueError(f"stage_placement={kind!r} is not a placement; pass 'loop' or 'v'")
        if kind == "v" and per_rank != 2:
            raise ValueError(
                f"stage_placement='v' places exactly 2 stages per rank (rank r holds r and "
                f"2P-1-r), but stages_per_rank={per_rank}; pass stages_per_rank=2 or use 'loop'"
            )
        return cls(kind, pipe_ranks, per_rank)

    @property
    def num_stages(self) -> int:
        """Stages in the whole pipeline."""
        return self.pipe_ranks * self.stages_per_rank

    def stages_of(self, pipe_rank: int) -> tuple[int, ...]:
        """The stages of ``pipe_rank``, ascending."""
        if not 0 <= pipe_rank < self.pipe_ranks:
            raise ValueError(
                f"pipe rank {pipe_rank} is out of range: the pipeline has {self.pipe_ranks} pipe "
                f"ranks (0 to {self.pipe_ranks - 1})"
            )
        if self.kind == "v":
            return (pipe_rank, 2 * self.pipe_ranks - 1 - pipe_rank)
        return tuple(pipe_rank + round_ * self.pipe_ranks for round_ in range(self.stages_per_rank))

    def pipe_rank_of(self, stage: int) -> int:
        """The pipe rank holding ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(
                f"stage {stage} is out of range: the pipeline has {self.num_stages} stages "
                f"(0 to {self.num_stages - 1})"
            )
        if self.kind == "v" and stage >= self.pipe_ranks:
            return 2 * self.pipe_ranks - 1 - stage
        return stage % self.pipe_ranks

    def __repr__(self) -> str:
        return f"StagePlacement({self.kind!r}, {self.pipe_ranks} ranks x {self.stages_per_rank})"
