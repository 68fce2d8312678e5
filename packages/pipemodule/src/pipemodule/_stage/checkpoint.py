"""Per-layer checkpoint files: names compatible with DeepSpeed, atomic writes, safe loads."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from pipemodule._layout import PipelineLayout

__all__ = [
    "atomic_save",
    "layer_file",
    "load_layer_file",
    "load_layer_files",
    "save_layer_files",
    "stage_files",
]


def layer_file(directory: str | os.PathLike[str], layer_index: int, rank_repr: str) -> Path:
    """``layer_XX[-model_YY]-model_states.pt``: DeepSpeed's name for one global layer's state.

    The data and pipe coordinates are not part of the name: a layer's file is the same whichever
    stage holds it, which is what lets a checkpoint reload with a different number of stages.
    """
    name = f"layer_{layer_index:02d}"
    if rank_repr:
        name += f"-{rank_repr}"
    return Path(directory) / f"{name}-model_states.pt"


def atomic_save(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The bytes go to a temporary file in the same directory, are flushed to disk, and only then
    renamed over ``path`` (an atomic replace on POSIX and Windows); a crash or a full disk never
    leaves a truncated checkpoint under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as stream:
            torch.save(dict(state), stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_layer_file(
    path: Path, layer_index: int, map_location: torch.device
) -> dict[str, torch.Tensor]:
    """Load one layer's state with ``weights_only=True`` (no arbitrary code from the file)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint has no file for layer {layer_index}: {path} does not exist; was the "
            f"checkpoint saved from the same layer list (and model-parallel degree)?"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise RuntimeError(
            f"cannot read the checkpoint of layer {layer_index} from {path}: {error}"
        ) from error
    if not isinstance(state, dict):
        raise RuntimeError(
            f"the checkpoint of layer {layer_index} at {path} holds a {type(state).__name__}, "
            f"not a state dict"
        )
    return state


def stage_files(
    layout: PipelineLayout,
    stage: int,
    modules: Mapping[int, torch.nn.Module],
    tied_modules: Mapping[str, torch.nn.Module],
    *,
    owned_only: bool,
) -> list[tuple[int, torch.nn.Module]]:
    """``(global layer index, module)`` of each file a stage writes or reads, by layer index.

    A stage has a file per layer module it holds, and one per tie key it holds, under the key's
    first layer. Only the owner of a tie writes its file (``owned_only``); every holder reads it.
    """
    entries = list(modules.items())
    for key, module in tied_modules.items():
        tie = layout.ties[key]
        if not owned_only or tie.owner_stage == stage:
            entries.append((tie.first_layer, module))
    return sorted(entries, key=lambda entry: entry[0])


def save_layer_files(
    entries: list[tuple[int, torch.nn.Module]],
    directory: Path,
    rank_repr: str,
    *,
    exclude_frozen_params: bool,
) -> None:
    """Write one file per entry, each atomically."""
    for index, module in entries:
        state = module.state_dict()
        if exclude_frozen_params:
            frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
            state = {name: value for name, value in state.items() if name not in frozen}
        atomic_save(state, layer_file(directory, index, rank_repr))


def load_layer_files(
    entries: list[tuple[int, torch.nn.Module]],
    directory: Path,
    rank_repr: str,
    *,
    map_location: torch.device,
    strict: bool,
) -> None:
    """Load every entry's file into its module; a missing or mismatched file names the layer."""
    for index, module in entries:
        path = layer_file(directory, index, rank_repr)
        state = load_layer_file(path, index, map_location)
        try:
            module.load_state_dict(state, strict=strict)
        except RuntimeError as error:
            raise RuntimeError(
                f"the checkpoint of layer {index} at {path} does not fit "
                f"{type(module).__name__}: {error}"
            ) from error
