"""Where checkpoints live under a root, and how one becomes visible only once it is complete.

A save writes into a hidden staging directory; once every rank's part is written, the first
rank writes the commit marker (the last file), then renames the staging directory to its final
name: one atomic rename is the commit. A directory without the marker is never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipemodule._stage.checkpoint import CheckpointError, fsync_directory, write_atomically

__all__ = [
    "MARKER_FILE",
    "MARKER_FORMAT",
    "MARKER_VERSION",
    "checkpoint_name",
    "commit",
    "committed_checkpoints",
    "latest_checkpoint",
    "prepare_staging",
    "prune",
    "read_marker",
    "staging_path",
    "write_marker",
]

MARKER_FILE = "pipestack-checkpoint.json"
"""The commit marker: written last, after every rank's part; its absence means incomplete."""
MARKER_FORMAT = "pipestack-training-checkpoint"
MARKER_VERSION = 1
LATEST_FILE = "latest"
_NAME = re.compile(r"step_(\d+)")
_STAGING_SUFFIX = ".staging"
_REPLACED_SUFFIX = ".replaced"


def checkpoint_name(step: int) -> str:
    """``step_00000100``: the directory of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def staging_path(root: Path, name: str) -> Path:
    """The hidden directory a checkpoint is written into before it is committed."""
    return root / f".{name}{_STAGING_SUFFIX}"


def prepare_staging(root: Path, name: str) -> Path:
    """Create an empty staging directory, removing what interrupted saves left (first rank)."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.iterdir():
        # One job saves into a root at a time, so any staging directory is a dead save's.
        if leftover.name.startswith(".") and leftover.name.endswith(
            (_STAGING_SUFFIX, _REPLACED_SUFFIX)
        ):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = staging_path(root, name)
    staging.mkdir()
    return staging


def write_marker(directory: Path, marker: dict[str, Any]) -> None:
    """Write the commit marker atomically and durably (the last file of a checkpoint)."""
    text = json.dumps(marker, indent=1, sort_keys=True, allow_nan=False)
    write_atomically(text.encode(), directory / MARKER_FILE)


def commit(root: Path, staging: Path, name: str) -> Path:
    """Rename ``staging`` to ``root/name`` and point ``root/latest`` at it (first rank)."""
    final = root / name
    replaced = root / f".{name}{_REPLACED_SUFFIX}"
    if final.exists():
        # Saving the same step again: the old copy steps aside only for the instant between the
        # two renames; if the process dies there, the older checkpoints are still complete.
        os.replace(final, replaced)
    os.replace(staging, final)
    fsync_directory(root)
    shutil.rmtree(replaced, ignore_errors=True)
    write_atomically(f"{name}\n".encode(), root / LATEST_FILE)
    return final


def committed_checkpoints(root: Path) -> list[Path]:
    """The committed checkpoints under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match and (entry / MARKER_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from under ``root``: the last one saved, or None if there is none.

    ``root/latest`` names the last checkpoint committed; if it is missing or names a checkpoint
    that is gone, the committed checkpoint of the highest step is taken. Directories without a
    commit marker (interrupted saves) are never returned. Local: no communication.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root={root!r} is not a path; pass the directory checkpoints are saved in")
    directory = Path(root)
    pointer = directory / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _NAME.fullmatch(name) and (directory / name / MARKER_FILE).is_file():
            return directory / name
    committed = committed_checkpoints(directory)
    return committed[-1] if committed else None


def prune(root: Path, keep_last: int, keep: Path) -> list[Path]:
    """Delete all but the ``keep_last`` committed checkpoints of highest step (never ``keep``)."""
    committed = [path for path in committed_checkpoints(root) if path != keep]
    doomed = committed[: max(0, len(committed) - (keep_last - 1))]
    for path in doomed:
        # Un-commit first: a deletion cut short leaves a directory that is refused, not a
        # checkpoint with missing files.
        (path / MARKER_FILE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_marker(path: Path) -> dict[str, Any]:
    """The commit marker of the checkpoint at ``path``; CheckpointError if it is not committed."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"no checkpoint at {path}: it is not a directory; pass a directory that "
            f"save_checkpoint returned, or latest_checkpoint(root)"
        )
    marker_path = path / MARKER_FILE
    if not marker_path.is_file():
        raise CheckpointError(
            f"the checkpoint at {path} is incomplete: it has no commit marker {MARKER_FILE}, so "
            f"its save was interrupted (or it is not a pipestack checkpoint); load a committed "
            f"one, e.g. latest_checkpoint({str(path.parent)!r})"
        )
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"the commit marker {marker_path} is corrupted ({error}); load another checkpoint"
        ) from error
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise CheckpointError(f"{marker_path} is not a pipestack training-checkpoint marker")
    if marker.get("version") != MARKER_VERSION:
        raise CheckpointError(
            f"the checkpoint at {path} has format version {marker.get('version')!r}; this "
            f"pipestack reads version {MARKER_VERSION}: load it with the version that wrote it"
        )
    return marker
