"""One of several stages a rank holds, as the ``nn.Module`` a ``PipelineStage`` runs."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipemodule._stage.build import BuiltStage
from pipemodule._stage.forward import contiguous_outputs, run_layers

if TYPE_CHECKING:
    from pipemodule._module import PipelineModule

__all__ = ["StageModule"]


class StageModule(torch.nn.Module):
    """The layers of stage ``stage_index``, when its rank holds more than one stage.

    Its parameters have the names they have in the ``PipelineModule`` (``"3.up.weight"``,
    ``"tied_modules.embed.weight"``), and the modules are the same objects: a tie between two
    stages of one rank is one module. Forward behaviour (activation checkpointing, seeding) is
    read from the owning ``PipelineModule`` at every call, as DeepSpeed users change it there.
    """

    def __init__(
        self, owner: PipelineModule, stage_index: int, layers: Sequence[int], built: BuiltStage
    ):
        super().__init__()
        self.stage_index = stage_index
        self.layer_indices = tuple(layers)
        self.forward_funcs = built.forward_funcs
        # A weak reference: a strong one would make the owner a submodule (and a cycle).
        self._owner = weakref.ref(owner)
        for index, module in built.modules.items():
            self.add_module(str(index), module)
        self.tied_modules = torch.nn.ModuleDict(built.tied_modules)

    def forward(self, *inputs: Any) -> Any:
        owner = self._owner()
        if owner is None:
            raise RuntimeError(
                f"stage {self.stage_index} outlived its PipelineModule; keep the module alive "
                f"while its stages run"
            )
        owner.micro_offset += 1
        return contiguous_outputs(
            run_layers(owner, self.forward_funcs, self.layer_indices[0], inputs)
        )

    def extra_repr(self) -> str:
        return f"stage {self.stage_index}, layers {self.layer_indices[0]}..{self.layer_indices[-1]}"
