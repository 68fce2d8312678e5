"""What each pipeline stage holds in memory for training, from layer descriptions alone.

A stage holds the parameters of its layers, one gradient per trainable parameter and the
optimizer's state. A tied module is built once on every stage that uses its key, so its memory
is counted on each of those stages: that is what each GPU really holds. Activations are not
estimated: they depend on the batch, the schedule and activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from pipepartition import PartitionPlan
from pipespec import Layer, LayerInfo, TiedLayerSpec

__all__ = [
    "OPTIMIZER_STATES",
    "StageMemory",
    "TiedHolding",
    "estimate_stage_memory",
    "tied_holdings",
]

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


@dataclass(frozen=True)
class TiedHolding:
    """A tie key, the size of its module and the stages that each hold a copy."""

    key: str
    parameters: int
    layers: tuple[int, ...]
    stages: tuple[int, ...]


def _identity(layer: Layer) -> Hashable | None:
    """Layers with the same identity share one module within a stage; None: never shared."""
    if isinstance(layer, TiedLayerSpec):
        return ("tied", layer.key)
    if isinstance(layer, torch.nn.Module):
        # The same module object listed twice is registered once, so it is held once.
        return ("module", id(layer))
    return None  # a LayerSpec builds a new module each time; a callable holds nothing


def _trainable_bytes(info: LayerInfo) -> int:
    # LayerInfo has bytes for all parameters only; splitting them in proportion to the
    # element counts is exact whenever a layer's parameters share one dtype.
    if info.num_params == 0:
        return 0
    return info.param_bytes * info.trainable_params // info.num_params


def estimate_stage_memory(
    layers: Sequence[Layer],
    infos: Sequence[LayerInfo],
    plan: PartitionPlan,
    *,
    optimizer_states: int,
) -> list[StageMemory]:
    """Per-stage parameters and training bytes for ``plan`` over ``layers``.

    Gradients and optimizer state are the size of the trainable parameters at their dtype,
    as torch's optimizers keep them (mixed-precision master copies are not included).
    """
    if len(infos) != len(layers) or plan.num_layers != len(layers):
        raise ValueError(
            f"{len(layers)} layers, {len(infos)} descriptions and a plan of {plan.num_layers} "
            "layers: pass one description per layer and the plan made for these layers"
        )
    if optimizer_states < 0:
        raise ValueError(f"optimizer_states={optimizer_states} must be >= 0")
    stages: list[StageMemory] = []
    for stage, indices in enumerate(plan.stages):
        seen: set[Hashable] = set()
        parameters = trainable = parameter_bytes = trainable_bytes = 0
        tied: list[str] = []
        for index in indices:
            layer, info = layers[index], infos[index]
            identity = _identity(layer)
            if identity is not None:
                if identity in seen:
                    continue
                seen.add(identity)
            if isinstance(layer, TiedLayerSpec):
                tied.append(layer.key)
            parameters += info.num_params
            trainable += info.trainable_params
            parameter_bytes += info.param_bytes
            trainable_bytes += _trainable_bytes(info)
        stages.append(
            StageMemory(
                stage=stage,
                layers=indices,
                names=tuple(infos[index].name for index in indices),
                parameters=parameters,
                trainable_parameters=trainable,
                parameter_bytes=parameter_bytes,
                gradient_bytes=trainable_bytes,
                optimizer_bytes=optimizer_states * trainable_bytes,
                tied_keys=tuple(tied),
            )
        )
    return stages


def tied_holdings(
    layers: Sequence[Layer], infos: Sequence[LayerInfo], plan: PartitionPlan
) -> list[TiedHolding]:
    """Every tie key, in order of first use, with the stages that hold a copy of its module."""
    occurrences: dict[str, list[int]] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, TiedLayerSpec):
            occurrences.setdefault(layer.key, []).append(index)
    return [
        TiedHolding(
            key=key,
            parameters=infos[indices[0]].num_params,
            layers=tuple(indices),
            stages=tuple(sorted({plan.stage_of(index) for index in indices})),
        )
        for key, indices in occurrences.items()
    ]
