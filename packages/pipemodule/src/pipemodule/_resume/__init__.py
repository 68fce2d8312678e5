"""Full training-state checkpoints (placeholder until the resumable-training work lands)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipemodule._training import PipelineTrainer

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    trainer: PipelineTrainer, path: str | os.PathLike[str], **extra_state: Any
) -> Path:
    raise NotImplementedError("full training-state checkpoints are not written yet")


def load_checkpoint(trainer: PipelineTrainer, path: str | os.PathLike[str]) -> dict[str, Any]:
    raise NotImplementedError("full training-state checkpoints are not written yet")
