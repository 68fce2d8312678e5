"""The default activation-checkpointing function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.utils.checkpoint

__all__ = ["CheckpointFn", "activation_checkpoint"]

CheckpointFn = Callable[..., Any]
"""``fn(function, *args)``: runs ``function(*args)``, keeping only what backward needs."""


def activation_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """torch's non-reentrant checkpoint: recomputes ``function`` during backward.

    Non-reentrant checkpointing works when no input requires grad (the first stage's token ids)
    and keeps the RNG state of the first run for the recomputation, so dropout masks match.
    """
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
