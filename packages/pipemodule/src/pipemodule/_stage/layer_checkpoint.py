"""Saving and loading a PipelineModule's DeepSpeed-style layer files, collectively."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipemodule._stage.checkpoint import read_layer_files, save_layer_files
from pipemodule._stage.collective import run_on_every_rank

if TYPE_CHECKING:
    from pipemodule._module import PipelineModule

__all__ = ["load_layer_checkpoint", "save_layer_checkpoint"]


def save_layer_checkpoint(
    module: PipelineModule, directory: Path, *, exclude_frozen_params: bool
) -> None:
    """Write ``module``'s layer files (first data-parallel replica only); collective."""

    def write() -> None:
        if module.grid.axis_rank("data") == 0:
            save_layer_files(
                module.layer_modules(owned_only=True),
                directory,
                module.layer_file_suffix(),
                exclude_frozen_params=exclude_frozen_params,
            )

    run_on_every_rank(f"saving the checkpoint to {directory}", write, module.grid.process_group)


def load_layer_checkpoint(module: PipelineModule, directory: Path, *, strict: bool) -> None:
    """Load ``module``'s layer files, whatever layout wrote them; collective.

    Every rank reads and checks all of its files first; only when every rank's check passed
    does any rank change a module, so a bad file on one rank leaves every rank's model as it was.
    """
    checked = run_on_every_rank(
        f"loading the checkpoint from {directory}",
        lambda: read_layer_files(
            module.layer_modules(owned_only=False),
            directory,
            module.layer_file_suffix(),
            map_location=module.device,
            strict=strict,
        ),
        module.grid.process_group,
    )
    for target, state in checked:
        # Checked above (frozen parameters may be absent); strict=False only lets them be.
        target.load_state_dict(state, strict=False)
