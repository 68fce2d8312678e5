"""Checks of a checkpoint against the trainer that will load it, before anything is touched.

Everything here reads only the commit marker, DCP's metadata and the digests of the files this
rank will read: a wrong model (names, shapes, dtypes), a missing part, another optimizer or
scheduler, a different model-parallel degree or a corrupted file raise a ``CheckpointError``
while the model, optimizer and scheduler are still as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.tensor import DTensor

from pipemodule._resume.state import (
    EXTRA,
    GROUPS,
    SCHEDULER,
    TRAINER,
    model_degree,
    model_key,
    optimizer_names,
    optimizer_state_key,
    qualified_name,
    rng_key,
    slice_prefix,
)
from pipemodule._resume.storage import file_digest
from pipemodule._stage.checkpoint import CheckpointError

if TYPE_CHECKING:
    from pipemodule._training import PipelineTrainer

__all__ = ["check_compatible", "check_files", "read_plan", "same_layout"]

_SHOWN = 5  # problems listed in one message; the rest are counted


def same_layout(trainer: PipelineTrainer, marker: Mapping[str, Any]) -> bool:
    """Whether the checkpoint was written by the same topology (then RNG states carry over)."""
    topology = trainer.module.layout.topology
    saved = marker.get("topology", {})
    return bool(
        saved.get("axes") == list(topology.axes)
        and saved.get("dims") == list(topology.dims)
        and marker.get("world_size")
        == torch.distributed.get_world_size(trainer.module.grid.process_group)
    )


def check_compatible(
    trainer: PipelineTrainer,
    path: Path,
    marker: Mapping[str, Any],
    metadata: Metadata,
    model_names: set[str],
) -> None:
    """The checkpoint fits this trainer: model, optimizer, scheduler, model-parallel degree.

    ``model_names`` is the union of the module's state-dict names over every rank, so names
    that the checkpoint has and no rank of this model has are found as well.
    """
    module, optimizer = trainer.module, trainer.optimizer
    saved_degree = marker.get("model_degree")
    if saved_degree != model_degree(module):
        raise CheckpointError(
            f"the checkpoint at {path} was saved with model-parallel degree {saved_degree} and "
            f"this model has {model_degree(module)}: resharding across the model axis is not "
            f"supported (pipe and data degrees may differ); load it with model degree "
            f"{saved_degree}"
        )
    expected = qualified_name(type(optimizer))
    if marker.get("optimizer") != expected:
        raise CheckpointError(
            f"the checkpoint at {path} holds the state of a {marker.get('optimizer')} optimizer, "
            f"and the trainer's optimizer is a {expected}; build the same optimizer class "
            f"to resume"
        )
    groups = marker.get("param_groups")
    if groups != len(optimizer.param_groups):
        raise CheckpointError(
            f"the checkpoint at {path} has {groups} optimizer parameter groups and the trainer's "
            f"optimizer has {len(optimizer.param_groups)}; build the optimizer with the same "
            f"groups"
        )
    saved_scheduler = marker.get("lr_scheduler")
    scheduler = trainer.lr_scheduler
    current = None if scheduler is None else qualified_name(type(scheduler))
    if saved_scheduler != current:
        raise CheckpointError(
            f"the checkpoint at {path} has lr_scheduler {saved_scheduler} and the trainer has "
            f"{current}; pass the same kind of lr_scheduler to the PipelineTrainer"
        )
    problems = []
    entries = metadata.state_dict_metadata
    for name, tensor in module.state_dict().items():
        entry = entries.get(model_key(module, name))
        if not isinstance(entry, TensorStorageMetadata):
            problems.append(f"{name!r} is missing")
        elif tuple(entry.size) != tuple(tensor.shape):
            problems.append(
                f"{name!r} has shape {tuple(entry.size)} in the checkpoint and "
                f"{tuple(tensor.shape)} in the model"
            )
        elif entry.properties.dtype != tensor.dtype:
            problems.append(
                f"{name!r} is {entry.properties.dtype} in the checkpoint and {tensor.dtype} in "
                f"the model"
            )
    prefix = f"{slice_prefix(module)}model."
    unknown = sorted(
        key.removeprefix(prefix)
        for key in entries
        if key.startswith(prefix) and key.removeprefix(prefix) not in model_names
    )
    if unknown:
        problems.append(f"the model has no {_listed(unknown)}")
    if problems:
        raise CheckpointError(
            f"the checkpoint at {path} is not of this model: {_listed(problems, quote=False)}; "
            f"build the model from the same layer list (any number of stages and replicas)"
        )


def read_plan(
    trainer: PipelineTrainer, marker: Mapping[str, Any], metadata: Metadata, *, restore_rng: bool
) -> dict[str, Any]:
    """The keys this rank reads, each with an empty target DCP fills in."""
    module = trainer.module
    entries = metadata.state_dict_metadata
    tensors_of: dict[str, list[str]] = {}
    for key in entries:
        base, colon, _ = key.partition(":")
        if colon:
            tensors_of.setdefault(base, []).append(key)
    targets: dict[str, Any] = {}
    for name, tensor in module.state_dict().items():
        targets[model_key(module, name)] = torch.empty_like(tensor)

    parameters = dict(module.named_parameters())

    def add_tree(key: str, *, required: bool, like: torch.Tensor | None = None) -> None:
        entry = entries.get(key)
        if entry is None and not required:
            return
        if not isinstance(entry, BytesStorageMetadata):
            raise CheckpointError(
                f"the checkpoint has no {key!r} entry (or a tensor in its place): it is missing "
                f"a part; load another checkpoint"
            )
        targets[key] = ""
        for name in tensors_of.get(key, []):
            item = entries[name]
            if not isinstance(item, TensorStorageMetadata):
                raise CheckpointError(f"the checkpoint's {name!r} entry is not a tensor")
            size, dtype = tuple(item.size), item.properties.dtype
            if isinstance(like, DTensor) and size == tuple(like.shape):
                # A sharded parameter's state is read as its shard: DCP reads the part this
                # rank holds, from however the saving run held it (whole or sharded).
                targets[name] = torch.empty_like(like, dtype=dtype)
            else:
                targets[name] = torch.empty(size, dtype=dtype)

    for name in set(optimizer_names(module, trainer.optimizer)):
        add_tree(optimizer_state_key(module, name), required=False, like=parameters.get(name))
    add_tree(GROUPS, required=True)
    add_tree(TRAINER, required=True)
    if trainer.lr_scheduler is not None:
        add_tree(SCHEDULER, required=True)
    if restore_rng:
        add_tree(rng_key(torch.distributed.get_rank()), required=False)
    for key in entries:
        if key.startswith(EXTRA) and ":" not in key:
            add_tree(key, required=True)
    return targets


def check_files(
    path: Path, marker: Mapping[str, Any], metadata: Metadata, keys: Iterable[str]
) -> None:
    """Every file holding one of ``keys`` exists and has the digest the commit marker lists."""
    wanted = set(keys)
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"the DCP metadata of {path} lists no data files")
    files = sorted({info.relative_path for index, info in storage.items() if index.fqn in wanted})
    digests = marker.get("files", {})
    for name in files:
        file = path / name
        if name not in digests:
            raise CheckpointError(
                f"the checkpoint at {path} reads {name}, which its commit marker does not list"
            )
        if not file.is_file():
            raise CheckpointError(
                f"the checkpoint at {path} is missing its data file {name}; restore it or load "
                f"another checkpoint"
            )
        if file_digest(file) != digests[name]:
            raise CheckpointError(
                f"the checkpoint file {file} is corrupted: its SHA-256 differs from the one "
                f"recorded when it was saved; restore it or load another checkpoint"
            )


def _listed(items: list[str], *, quote: bool = True) -> str:
    shown = [repr(item) if quote else item for item in items[:_SHOWN]]
    more = len(items) - _SHOWN
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
