"""What each pipeline stage holds in memory for training, from the layout alone.

A stage holds the parameters of its layers, one gradient per trainable parameter and the
optimizer's state. A tied module is built once on every stage that uses its key, so its memory
is counted on each of those stages: that is what each GPU really holds. Activations are not
estimated: they depend on the batch, the schedule and activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipespec import LayerInfo, TiedLayerSpec

if TYPE_CHECKING:
    from pipemodule._layout.layout import PipelineLayout

__all__ = ["OPTIMIZER_STATES", "StageMemory", "estimate_stage_memory"]

OPTIMIZER_STATES: Mapping[str, int] = {"adam": 2, "adamw": 2, "sgd": 1, "none": 0}
"""Optimizer state tensors per trainable parameter, each the size of the parameter.

torch's Adam and AdamW keep two moments, SGD with momentum one buffer, plain SGD none.
"""


@dataclass(frozen=True)
class StageMemory:
    """One stage's parameters and the bytes it needs for them during training."""

    stage: int
    layers: range
    names: tuple[str, ...]
    parameters: int
    trainable_parameters: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    tied_keys: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes


def _trainable_bytes(info: LayerInfo) -> int:
    # LayerInfo has bytes for all parameters only; splitting them in proportion to the
    # element counts is exact whenever a layer's parameters share one dtype.
    if info.num_params == 0:
        return 0
    return info.param_bytes * info.trainable_params // info.num_params


def estimate_stage_memory(layout: PipelineLayout, *, optimizer_states: int) -> list[StageMemory]:
    """Per-stage parameters and training bytes of ``layout``.

    Gradients and optimizer state are the size of the trainable parameters at their dtype,
    as torch's optimizers keep them (mixed-precision master copies are not included). The
    layers are described on meta unless the layout already holds their descriptions.
    """
    if isinstance(optimizer_states, bool) or not isinstance(optimizer_states, int):
        raise TypeError(f"optimizer_states={optimizer_states!r} is not an int; pass e.g. 2 (Adam)")
    if optimizer_states < 0:
        raise ValueError(f"optimizer_states={optimizer_states} is negative; pass an int >= 0")
    infos = layout.layer_infos()
    stages: list[StageMemory] = []
    for stage in range(layout.num_stages):
        indices = layout.layers_of(stage)
        held = [infos[index] for index in layout.held_layers(stage)]
        trainable_bytes = sum(_trainable_bytes(info) for info in held)
        stages.append(
            StageMemory(
                stage=stage,
                layers=indices,
                names=tuple(infos[index].name for index in indices),
                parameters=sum(info.num_params for info in held),
                trainable_parameters=sum(info.trainable_params for info in held),
                parameter_bytes=sum(info.param_bytes for info in held),
                gradient_bytes=trainable_bytes,
                optimizer_bytes=optimizer_states * trainable_bytes,
                tied_keys=tuple(
                    layer.key
                    for layer in (layout.layers[index] for index in layout.held_layers(stage))
                    if isinstance(layer, TiedLayerSpec)
                ),
            )
        )
    return stages
