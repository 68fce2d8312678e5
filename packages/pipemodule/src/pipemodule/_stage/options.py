"""Checks of PipelineModule's arguments that shape the local stage rather than the layout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from pipemodule._checks import boolean, callable_or_none, non_negative_int, require_callable
from pipemodule._stage.activation_checkpoint import CheckpointFn
from pipemodule._stage.seeding import SeedFn

__all__ = [
    "StageOptions",
    "check_checkpoint_interval",
    "refuse_instances",
    "require_initialised",
]


def require_initialised() -> None:
    """Raise unless torch.distributed has a default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "PipelineModule needs torch.distributed: call torch.distributed.init_process_group() "
            "first (launch with torchrun; a world of one process works too)"
        )


def refuse_instances(layers: Sequence[object], cls: type, why: str) -> None:
    """Raise if a layer is a ``cls``, e.g. a PipelineModule inside a pipeline's layer list."""
    for index, layer in enumerate(layers):
        if isinstance(layer, cls):
            raise ValueError(
                f"layer {index} is a {cls.__name__}; {why}: pass its layer list instead"
            )


def check_checkpoint_interval(name: str, value: object) -> int:
    """An activation checkpoint interval: an int >= 0, 0 disabling checkpointing."""
    return non_negative_int(name, value, "(0 disables activation checkpointing)")


@dataclass(frozen=True)
class StageOptions:
    """The checked arguments of how a stage is seeded, run and checkpointed."""

    loss_fn: Callable[..., Any] | None
    seed_layers: bool
    seed_fn: SeedFn | None
    base_seed: int
    activation_checkpoint_interval: int
    activation_checkpoint_func: CheckpointFn
    checkpointable_layers: tuple[str, ...] | None

    def __post_init__(self) -> None:
        callable_or_none("loss_fn", self.loss_fn, "loss_fn(outputs, labels)")
        boolean("seed_layers", self.seed_layers)
        callable_or_none("seed_fn", self.seed_fn, "seed_fn(seed)")
        non_negative_int("base_seed", self.base_seed)
        check_checkpoint_interval(
            "activation_checkpoint_interval", self.activation_checkpoint_interval
        )
        require_callable(
            "activation_checkpoint_func",
            self.activation_checkpoint_func,
            "fn(function, *args), e.g. torch.utils.checkpoint.checkpoint",
        )

    @staticmethod
    def layer_classes(names: Sequence[str] | None) -> tuple[str, ...] | None:
        """``checkpointable_layers`` as a tuple of class names."""
        if names is None:
            return None
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise TypeError(
                f"checkpointable_layers={names!r} must be a list of layer class names, e.g. "
                f"['TransformerBlock']"
            )
        return tuple(names)
