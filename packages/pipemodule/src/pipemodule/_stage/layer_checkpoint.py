"""Saving and loading a PipelineModule's DeepSpeed-style layer files, collectively.

[Note: layer files of a sharded module]
Layer files always hold whole tensors, so that a run with another data-parallel mode (or
DeepSpeed) reads them. Under FSDP a layer's parameters are DTensor shards over the data group:
every data rank gathers each full tensor first (a collective over that group, in the same
order everywhere, all before the first file is written, so a failing write cannot leave a peer
waiting in a gather), and the first replica writes them. Loading cuts each whole tensor into
this rank's shard locally, with no communication.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

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
        entries = module.layer_modules(owned_only=True)
        writes = module.grid.axis_rank("data") == 0
        states = None
        if any(_sharded(layer) for _, layer in entries):
            states = [_full_state(layer, keep=writes) for _, layer in entries]
        if writes:
            save_layer_files(
                entries,
                directory,
                module.layer_file_suffix(),
                exclude_frozen_params=exclude_frozen_params,
                states=states,
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
        target.load_state_dict(_shards_for(target, state), strict=False)


def _sharded(layer: torch.nn.Module) -> bool:
    return any(isinstance(value, DTensor) for value in layer.state_dict().values())


def _full_state(layer: torch.nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    """``layer``'s state with every shard gathered whole (collective over the shards' mesh)."""
    state = {}
    for name, value in layer.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            state[name] = full.detach()
    return state


def _shards_for(target: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each whole tensor cut as ``target`` holds it (a DTensor shard); local."""
    current = target.state_dict()
    cut = {}
    for name, value in state.items():
        held = current.get(name)
        if isinstance(held, DTensor):
            # src_data_rank=None: every rank takes its own piece of the tensor it read.
            value = distribute_tensor(value, held.device_mesh, held.placements, src_data_rank=None)
        cut[name] = value
    return cut
