"""What a memory limit is a limit of: the training step whose per-stage peak it caps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipemodule._checks import non_negative_int, positive_int

__all__ = ["TrainingStep"]


@dataclass(frozen=True)
class TrainingStep:
    """One training step as ``stage_memory_limits`` sees it: with it, a limit caps a stage's peak.

    Give it to ``plan_pipeline`` / ``PipelineModule`` as ``training_step=`` and every stage's
    peak for that step (parameters, gradients, optimizer state and the activations autograd
    saves, times the micro-batches the stage holds at its peak under ``schedule``; see
    :func:`pipemodule.plan_memory`) stays within its limit.

    Attributes:
        sample: one micro-batch's input to the first layer: a tensor or tuple of tensors,
            meta or real; only shapes and dtypes are read (e.g. ``torch.empty(4, 2048,
            dtype=torch.long, device="meta")``).
        schedule: torch's schedule name, any case ('gpipe', '1f1b', 'interleaved1f1b', ...).
        n_microbatches: micro-batches per step.
        optimizer_states: state tensors the optimizer keeps per trainable parameter (Adam 2,
            SGD with momentum 1; ``pipemodule.OPTIMIZER_STATES``).
        activation_checkpoint_interval: for ``plan_pipeline``; ``PipelineModule`` uses its
            own argument of that name (and ``checkpointable_layers``), and refuses a
            different value here.
        checkpointable_layers: as ``PipelineModule`` takes it.
    """

    sample: Any
    schedule: str
    n_microbatches: int
    optimizer_states: int = 2
    activation_checkpoint_interval: int = 0
    checkpointable_layers: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, str):
            raise TypeError(
                f"TrainingStep schedule={self.schedule!r} is not a name; pass e.g. '1f1b'"
            )
        positive_int("TrainingStep n_microbatches", self.n_microbatches)
        non_negative_int("TrainingStep optimizer_states", self.optimizer_states, "(e.g. Adam 2)")
        non_negative_int(
            "TrainingStep activation_checkpoint_interval",
            self.activation_checkpoint_interval,
            "(0 disables)",
        )
        if self.sample is None:
            raise ValueError(
                "TrainingStep needs sample: one micro-batch's input to the first layer, e.g. "
                "torch.empty(4, 2048, dtype=torch.long, device='meta')"
            )
