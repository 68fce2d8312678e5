"""``load_checkpoint``: check everything, read into fresh tensors, then apply on every rank."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from pipemodule._resume.commit import MARKER_FILE, latest_checkpoint, read_marker
from pipemodule._resume.state import (
    EXTRA,
    GROUPS,
    SCHEDULER,
    TRAINER,
    LoadedState,
    model_key,
    optimizer_names,
    optimizer_state_key,
    rng_key,
    take_tree,
)
from pipemodule._resume.storage import (
    METADATA_FILE,
    SafeLoadPlanner,
    SafeReader,
    file_digest,
    read_metadata,
)
from pipemodule._resume.validate import check_compatible, check_files, read_plan, same_layout
from pipemodule._stage.checkpoint import CheckpointError
from pipemodule._stage.collective import gather_objects, run_on_every_rank

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from pipemodule._training import PipelineTrainer

__all__ = ["load_checkpoint", "resolve_checkpoint"]

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint (committed or not), else its latest checkpoint."""
    if (path / MARKER_FILE).exists() or (path / METADATA_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    return path if latest is None else latest


def load_checkpoint(trainer: PipelineTrainer, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote, into any layout; returns the extra state.

    ``path`` is a checkpoint directory, or the directory checkpoints are saved in (its latest
    checkpoint is loaded). The pipe and data-parallel degrees may differ from the saving run's;
    each rank reads only the entries of its own stage. RNG states are restored only when the
    layout is the same (they belong to ranks).

    Nothing is changed until every rank has checked the checkpoint and read its part: an
    incomplete or corrupted checkpoint, another model, optimizer or scheduler raise a
    ``CheckpointError`` on every rank and leave the model, optimizer and scheduler as they were.
    No pickled code is run: DCP's metadata is unpickled with an allow-list of its own classes,
    and every other value is a tensor or JSON text.

    Collective over the pipeline's process group.
    """
    from pipemodule._training import PipelineTrainer

    if not isinstance(trainer, PipelineTrainer):
        raise TypeError(f"trainer={trainer!r} is not a PipelineTrainer")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r} is not a path; pass a checkpoint directory")
    module = trainer.module
    group = module.grid.process_group
    directory = resolve_checkpoint(Path(path))

    def check_marker() -> tuple[dict[str, Any], Metadata]:
        marker = read_marker(directory)
        metadata_path = directory / METADATA_FILE
        if not metadata_path.is_file():
            raise CheckpointError(f"the checkpoint at {directory} has no DCP {METADATA_FILE}")
        if file_digest(metadata_path) != marker.get("files", {}).get(METADATA_FILE):
            raise CheckpointError(
                f"the checkpoint file {metadata_path} is corrupted: its SHA-256 differs from "
                f"the one recorded when it was saved; load another checkpoint"
            )
        try:
            metadata = read_metadata(metadata_path)
        except Exception as error:
            raise CheckpointError(f"cannot read {metadata_path}: {error}") from error
        return marker, metadata

    marker, metadata = run_on_every_rank(f"opening the checkpoint {directory}", check_marker, group)
    names: set[str] = set()
    for part in gather_objects(sorted(module.state_dict()), group):
        names.update(part)
    restore_rng = same_layout(trainer, marker)

    def plan() -> dict[str, Any]:
        check_compatible(trainer, directory, marker, metadata, names)
        targets = read_plan(trainer, marker, metadata, restore_rng=restore_rng)
        check_files(directory, marker, metadata, targets)
        return targets

    targets = run_on_every_rank(f"checking the checkpoint {directory}", plan, group)

    def read() -> None:
        dcp_load(
            targets,
            storage_reader=SafeReader(directory, metadata),
            planner=SafeLoadPlanner(),
            process_group=group,
        )

    run_on_every_rank(f"reading the checkpoint {directory}", read, group)
    loaded = run_on_every_rank(
        f"decoding the checkpoint {directory}",
        lambda: _decode(trainer, targets, restore_rng=restore_rng),
        group,
    )
    loaded.apply(trainer)
    if not restore_rng:
        logger.info("%s was saved by another layout: RNG states were not restored", directory)
    return loaded.extra


def _decode(trainer: PipelineTrainer, loaded: dict[str, Any], *, restore_rng: bool) -> LoadedState:
    module, optimizer = trainer.module, trainer.optimizer
    model = {name: loaded[model_key(module, name)] for name in module.state_dict()}
    current = optimizer.state_dict()
    names = optimizer_names(module, optimizer)
    state: dict[int, Any] = {}
    for index, name in enumerate(names):
        key = optimizer_state_key(module, name)
        if key in loaded:
            value = take_tree(loaded, key)
            if not isinstance(value, dict):
                raise CheckpointError(f"the optimizer state of {name!r} is not a dict")
            state[index] = value
    groups = take_tree(loaded, GROUPS)
    if not isinstance(groups, list) or len(groups) != len(current["param_groups"]):
        raise CheckpointError("the checkpoint's optimizer param_groups do not match the optimizer")
    param_groups = [
        {**saved, "params": now["params"]}
        for saved, now in zip(groups, current["param_groups"], strict=True)
    ]
    scheduler = take_tree(loaded, SCHEDULER) if trainer.lr_scheduler is not None else None
    rng_name = rng_key(torch.distributed.get_rank())
    rng = take_tree(loaded, rng_name) if restore_rng and rng_name in loaded else None
    extra = {
        key.removeprefix(EXTRA): take_tree(loaded, key)
        for key in loaded
        if key.startswith(EXTRA) and ":" not in key
    }
    return LoadedState(
        model=model,
        optimizer={"state": state, "param_groups": param_groups},
        trainer=take_tree(loaded, TRAINER),
        lr_scheduler=scheduler,
        rng=rng,
        extra=extra,
    )
