"""DeepSpeed's accessor names of a PipelineModule, over its layout and grid."""

from __future__ import annotations

from pipemodule._layout import PipelineLayout
from pipetopo import PipelineParallelGrid, ProcessTopology

__all__ = ["DeepSpeedModuleNames"]


class DeepSpeedModuleNames:
    """``partitions()``, ``stage_owner()``, ``topology()``, ``mpu()``: DeepSpeed's spellings.

    A mixin of ``PipelineModule``, which sets the attributes annotated here.
    """

    _layout: PipelineLayout
    _grid: PipelineParallelGrid
    num_stages: int
    parts: list[int]

    def partitions(self) -> list[int]:
        """Stage boundaries: stage ``s`` holds layers ``parts[s]`` to ``parts[s + 1] - 1``."""
        return self.parts

    def stage_owner(self, layer_idx: int) -> int:
        """The stage that holds global layer ``layer_idx`` (see ``layout.pipe_rank_of``)."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx={layer_idx!r} is not an int; pass a global layer index")
        num_layers = self._layout.num_layers
        if not 0 <= layer_idx < num_layers:
            raise ValueError(
                f"layer_idx={layer_idx} is out of range: the pipeline has {num_layers} "
                f"layers (0 to {num_layers - 1})"
            )
        return self._layout.stage_of(layer_idx)

    def topology(self) -> ProcessTopology:
        """The process topology (pipe x data x ...) of this pipeline."""
        return self._layout.topology

    @property
    def _topo(self) -> ProcessTopology:
        return self._layout.topology

    def mpu(self) -> PipelineParallelGrid:
        """The communication grid, with DeepSpeed's model-parallel-unit accessors."""
        return self._grid

    def num_pipeline_stages(self) -> int:
        return self.num_stages
