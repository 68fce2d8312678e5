"""Per-layer checkpoint files: names compatible with DeepSpeed, a manifest per writer, safe loads.

Each rank that writes files (the first data-parallel replica of every stage) first leaves a
``pipestack-layers.<first file>.saving`` marker, writes its files (each atomically), then its
manifest ``pipestack-layers.<first file>.json`` (the SHA-256 of every file it wrote), removes
the manifests of older saves that listed the same files, and only then removes its marker. A
rank killed or out of disk in the middle of a save leaves its marker behind, so the directory is
refused as incomplete rather than loaded as a mixture of old and new layers.

Loading reads and checks every file a rank needs (present, listed in a manifest with the same
digest, readable without unpickling code, the right keys, shapes and dtypes) before it loads any
into the module. Directories with no manifest at all (DeepSpeed's, or pipestack's before
manifests) still load: their files are checked the same way except for the digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipemodule._layout import PipelineLayout

__all__ = [
    "CheckpointError",
    "atomic_save",
    "fsync_directory",
    "layer_file",
    "load_layer_file",
    "read_layer_files",
    "save_layer_files",
    "stage_files",
    "write_atomically",
]

logger = logging.getLogger(__name__)

_MANIFEST_PREFIX = "pipestack-layers."
_MANIFEST_FORMAT = "pipestack-layer-files"
_MANIFEST_VERSION = 1


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint on disk that must not be loaded: incomplete, corrupted, or of another model.

    Both a ``RuntimeError`` (what loading a mismatched layer file always raised) and a
    ``ValueError`` (the checkpoint is a bad value for this model).
    """


def layer_file(directory: str | os.PathLike[str], layer_index: int, rank_repr: str) -> Path:
    """``layer_XX[-model_YY]-model_states.pt``: DeepSpeed's name for one global layer's state.

    The data and pipe coordinates are not part of the name: a layer's file is the same whichever
    stage holds it, which is what lets a checkpoint reload with a different number of stages.
    """
    name = f"layer_{layer_index:02d}"
    if rank_repr:
        name += f"-{rank_repr}"
    return Path(directory) / f"{name}-model_states.pt"


def write_atomically(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The bytes go to a temporary file in the same directory, are flushed to disk, and only then
    renamed over ``path`` (an atomic replace on POSIX and Windows); a crash or a full disk never
    leaves a truncated file under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_save(state: Mapping[str, torch.Tensor], path: Path) -> str:
    """``torch.save`` ``state`` to ``path`` atomically; returns the file's SHA-256."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getvalue()
    write_atomically(data, path)
    return hashlib.sha256(data).hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable; not every platform can open a directory."""
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
        raise FileNotFoundError(_missing(path, layer_index))
    return _parse(path.read_bytes(), path, layer_index, map_location)


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
    states: list[dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write one file per entry, each atomically, bracketed by this writer's marker and manifest.

    ``states`` (one per entry) replaces the modules' own state dicts, e.g. their full tensors
    when the modules hold shards. The marker is left behind if the save does not finish (an
    exception, a full disk, a kill), so that loads refuse the directory until a save completes.
    """
    if not entries:
        return
    paths = [layer_file(directory, index, rank_repr) for index, _ in entries]
    writer = paths[0].name.removesuffix("-model_states.pt")
    directory.mkdir(parents=True, exist_ok=True)
    saving = directory / f"{_MANIFEST_PREFIX}{writer}.saving"
    write_atomically(b"", saving)
    _remove_stale_temporaries(paths)
    digests: dict[str, str] = {}
    for position, ((_, module), path) in enumerate(zip(entries, paths, strict=True)):
        state = module.state_dict() if states is None else states[position]
        if exclude_frozen_params:
            frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
            state = {name: value for name, value in state.items() if name not in frozen}
        digests[path.name] = atomic_save(state, path)
    manifest = directory / f"{_MANIFEST_PREFIX}{writer}.json"
    record = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "files": digests}
    write_atomically(json.dumps(record, indent=1, sort_keys=True).encode(), manifest)
    for other, listed in _read_manifests(directory).items():
        if other != manifest.name and listed.keys() & digests.keys():
            (directory / other).unlink(missing_ok=True)
    saving.unlink()
    fsync_directory(directory)


def read_layer_files(
    entries: list[tuple[int, torch.nn.Module]],
    directory: Path,
    rank_repr: str,
    *,
    map_location: torch.device,
    strict: bool,
) -> list[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """Read and check every entry's file, touching no module; ``(module, state)`` per entry.

    Raises:
        FileNotFoundError: a file is missing (the message names the layer and the path).
        CheckpointError: a save into ``directory`` did not finish, a file is not the one its
            manifest lists (corrupted, or left from another save), cannot be read without
            running pickled code, or does not fit its module (keys, shapes, dtypes).
    """
    interrupted = sorted(path.name for path in directory.glob(f"{_MANIFEST_PREFIX}*.saving"))
    if interrupted:
        raise CheckpointError(
            f"the checkpoint in {directory} is incomplete: a save into it did not finish "
            f"({', '.join(interrupted)} left behind), so its files may mix two saves; save the "
            f"model again into it, or load another checkpoint"
        )
    listed: dict[str, str] = {}
    for files in _read_manifests(directory).values():
        listed.update(files)
    if not listed:
        logger.info("%s has no pipestack manifest: loading its layer files unchecked", directory)
    loaded = []
    for index, module in entries:
        path = layer_file(directory, index, rank_repr)
        if not path.is_file():
            raise FileNotFoundError(_missing(path, index))
        data = path.read_bytes()
        if listed:
            expected = listed.get(path.name)
            if expected is None:
                raise CheckpointError(
                    f"the checkpoint file of layer {index}, {path}, is not listed by the manifest "
                    f"of any save into {directory}: it is left from an older save or copied in; "
                    f"save the model again"
                )
            if hashlib.sha256(data).hexdigest() != expected:
                raise CheckpointError(
                    f"the checkpoint file of layer {index}, {path}, is corrupted or from another "
                    f"save: its SHA-256 differs from the one its manifest lists; restore the file "
                    f"or load another checkpoint"
                )
        state = _parse(data, path, index, map_location)
        _check_fits(state, module, index, path, strict=strict)
        loaded.append((module, state))
    return loaded


def _missing(path: Path, layer_index: int) -> str:
    return (
        f"checkpoint has no file for layer {layer_index}: {path} does not exist; was the "
        f"checkpoint saved from the same layer list (and model-parallel degree)?"
    )


def _parse(
    data: bytes, path: Path, layer_index: int, map_location: torch.device
) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read the checkpoint of layer {layer_index} from {path}: {error}"
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise CheckpointError(
            f"the checkpoint of layer {layer_index} at {path} holds a {type(state).__name__}, "
            f"not a state dict of tensors"
        )
    return state


def _check_fits(
    state: Mapping[str, torch.Tensor],
    module: torch.nn.Module,
    index: int,
    path: Path,
    *,
    strict: bool,
) -> None:
    expected = module.state_dict()
    problems = []
    if strict:
        # Frozen parameters are what save_state_dict(exclude_frozen_params=True) leaves out on
        # purpose: their absence keeps the model's own values, it is not a missing key.
        frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
        missing = sorted(expected.keys() - state.keys() - frozen)
        unexpected = sorted(state.keys() - expected.keys())
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
    for name, value in state.items():
        target = expected.get(name)
        if target is None:
            continue
        if value.shape != target.shape:
            problems.append(
                f"{name!r} has shape {tuple(value.shape)} in the file and "
                f"{tuple(target.shape)} in the model"
            )
        elif value.dtype != target.dtype:
            problems.append(
                f"{name!r} is {value.dtype} in the file and {target.dtype} in the model "
                f"(convert the model or the checkpoint first)"
            )
    if problems:
        raise CheckpointError(
            f"the checkpoint of layer {index} at {path} does not fit "
            f"{type(module).__name__}: {'; '.join(problems)}"
        )


def _read_manifests(directory: Path) -> dict[str, dict[str, str]]:
    """Each manifest's file digests, by manifest name; CheckpointError if one is unreadable."""
    manifests: dict[str, dict[str, str]] = {}
    for path in sorted(directory.glob(f"{_MANIFEST_PREFIX}*.json")):
        try:
            record: Any = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"the layer-file manifest {path} is corrupted ({error}); save the model again"
            ) from error
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict) or record.get("format") != _MANIFEST_FORMAT:
            raise CheckpointError(f"{path} is not a pipestack layer-file manifest")
        manifests[path.name] = {str(name): str(digest) for name, digest in files.items()}
    return manifests


def _remove_stale_temporaries(paths: list[Path]) -> None:
    # A writer killed inside write_atomically leaves its temporary file; remove this writer's.
    for path in paths:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
