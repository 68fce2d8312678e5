"""``save_checkpoint``: the full training state, written with torch.distributed.checkpoint."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from pipemodule._resume.commit import (
    MARKER_FORMAT,
    MARKER_VERSION,
    checkpoint_name,
    commit,
    prepare_staging,
    prune,
    staging_path,
    write_marker,
)
from pipemodule._resume.state import EXTRA, model_degree, qualified_name, saved_state
from pipemodule._resume.storage import METADATA_FILE, file_digest
from pipemodule._stage.collective import gather_objects, run_on_every_rank

if TYPE_CHECKING:
    from pipemodule._training import PipelineTrainer

__all__ = ["save_checkpoint"]


def save_checkpoint(
    trainer: PipelineTrainer,
    path: str | os.PathLike[str],
    *,
    keep_last: int | None = None,
    **extra_state: Any,
) -> Path:
    """Save the full training state as ``path/step_<step_count>``; returns that directory.

    The checkpoint holds the model, the optimizer state (keyed by the parameters' global names),
    the trainer's step count and clipping state, the LR scheduler if the trainer has one, every
    rank's RNG states, and ``extra_state``: keyword arguments whose values are tensors, numbers,
    strings, bools, None, or dicts, lists and tuples of those (a data loader's position, an
    epoch). Ranks may pass different keys; a key passed on several ranks must have the same
    value on each. It is written with ``torch.distributed.checkpoint`` into a hidden staging
    directory and becomes ``path/step_<step_count>`` by one rename once every rank's part is
    written; ``path/latest`` then names it. With ``keep_last=K``, all but the ``K`` committed
    checkpoints of highest step under ``path`` are deleted afterwards.

    Collective over the pipeline's process group; ``path`` must be one directory that every rank
    sees (a shared file system). Returns on every rank once the checkpoint is committed, or
    raises on every rank.
    """
    from pipemodule._training import PipelineTrainer

    if not isinstance(trainer, PipelineTrainer):
        raise TypeError(f"trainer={trainer!r} is not a PipelineTrainer")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r} is not a path; pass the directory to save checkpoints in")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise ValueError(
            f"keep_last={keep_last!r} must be a positive int (checkpoints to keep), or None "
            f"to keep every checkpoint"
        )
    module = trainer.module
    group = module.grid.process_group
    root = Path(path)
    name = checkpoint_name(trainer.step_count)

    state = run_on_every_rank(
        f"preparing checkpoint {name}", lambda: saved_state(trainer, extra_state), group
    )
    check_extra_agrees(state, group)
    first = torch.distributed.get_rank(group) == 0
    staging = staging_path(root, name)
    run_on_every_rank(
        f"creating {staging}", lambda: prepare_staging(root, name) if first else None, group
    )

    def write() -> Metadata:
        writer = FileSystemWriter(staging, sync_files=True, overwrite=True)
        metadata: Metadata = dcp_save(
            state,
            storage_writer=writer,
            planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
            process_group=group,
        )
        return metadata

    metadata = run_on_every_rank(f"writing checkpoint {name} to {staging}", write, group)
    digests = _digest_files(staging, metadata, group)

    def finish() -> Path:
        if not first:
            return root / name
        write_marker(staging, _marker(trainer, name, digests))
        final = commit(root, staging, name)
        if keep_last is not None:
            prune(root, keep_last, final)
        return final

    return run_on_every_rank(f"committing checkpoint {name} in {root}", finish, group)


def check_extra_agrees(state: Mapping[str, Any], group: torch.distributed.ProcessGroup) -> None:
    """Extra-state keys passed on several ranks have the same value on each (collective)."""
    mine: dict[str, str] = {}
    for key, value in state.items():
        if key.startswith(EXTRA):
            hasher = hashlib.sha256()
            if isinstance(value, torch.Tensor):
                flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                hasher.update(str((value.dtype, tuple(value.shape))).encode())
                hasher.update(bytes(flat.numpy().tobytes()))
            else:
                hasher.update(str(value).encode())
            mine[key] = hasher.hexdigest()
    seen: dict[str, str] = {}
    conflicts = set()
    for ranks_values in gather_objects(mine, group):
        for key, digest in ranks_values.items():
            if seen.setdefault(key, digest) != digest:
                conflicts.add(key.removeprefix(EXTRA).partition(":")[0])
    if conflicts:
        raise ValueError(
            f"extra state {sorted(conflicts)} differs between ranks; a checkpoint keeps one "
            f"value per name: pass the same value on every rank, or per-rank names "
            f"(e.g. loader_dp0=..., loader_dp1=...)"
        )


def _digest_files(
    staging: Path, metadata: Metadata, group: torch.distributed.ProcessGroup
) -> dict[str, str]:
    # Every rank hashes a share of the files, so a large checkpoint is read once in parallel.
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    files = sorted({info.relative_path for info in storage.values()} | {METADATA_FILE})
    rank, size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    mine = run_on_every_rank(
        f"hashing the checkpoint files in {staging}",
        lambda: {name: file_digest(staging / name) for name in files[rank::size]},
        group,
    )
    digests: dict[str, str] = {}
    for part in gather_objects(mine, group):
        digests.update(part)
    return digests


def _marker(trainer: PipelineTrainer, name: str, digests: dict[str, str]) -> dict[str, Any]:
    module = trainer.module
    topology = module.layout.topology
    scheduler = trainer.lr_scheduler
    return {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "name": name,
        "step": trainer.step_count,
        "world_size": torch.distributed.get_world_size(module.grid.process_group),
        "topology": {"axes": list(topology.axes), "dims": list(topology.dims)},
        "model_degree": model_degree(module),
        "num_layers": module.layout.num_layers,
        "optimizer": qualified_name(type(trainer.optimizer)),
        "param_groups": len(trainer.optimizer.param_groups),
        "lr_scheduler": None if scheduler is None else qualified_name(type(scheduler)),
        "torch_version": torch.__version__,
        "files": digests,
    }
