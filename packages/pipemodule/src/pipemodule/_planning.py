"""From a validated configuration to a partition plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pipemodule._config import PipelineConfig
from pipepartition import Parameters, PartitionPlan, plan_partition
from pipespec import Layer, LayerInfo, LayerSpec, describe, layer_name

__all__ = ["describe_layers", "plan_stages", "with_parameter_counts"]


def describe_layers(layers: Sequence[Layer]) -> list[LayerInfo]:
    """``describe`` every layer on the meta device, each distinct spec only once.

    Models repeat the same block spec many times; equal specs have equal parameter counts.
    """
    cache: dict[LayerSpec, LayerInfo] = {}
    infos: list[LayerInfo] = []
    for layer in layers:
        if isinstance(layer, LayerSpec):
            try:
                info = cache.get(layer)
                if info is None:
                    info = cache[layer] = describe(layer)
            except TypeError:  # a spec with unhashable arguments
                info = describe(layer)
        else:
            info = describe(layer)
        infos.append(info)
    return infos


def plan_stages(config: PipelineConfig, profile: Sequence[float] | None = None) -> PartitionPlan:
    """The partition of ``config.layers`` into stages.

    Layers are only described (built on the meta device) when the method or a memory limit
    needs their parameter counts; 'uniform' and 'type:REGEX' plans construct nothing.
    """
    names = [layer_name(layer) for layer in config.layers]
    parameters: list[int] | None = None
    sizes: list[int] | None = None
    if isinstance(config.method, Parameters) or config.stage_memory_limits is not None:
        infos = describe_layers(config.layers)
        parameters = [info.trainable_params for info in infos]
        sizes = [info.param_bytes for info in infos]
    plan = plan_partition(
        config.method,
        config.num_stages,
        names=names,
        parameters=parameters,
        profile=profile,
        speeds=config.stage_speeds,
        capacities=config.stage_memory_limits,
        sizes=sizes if config.stage_memory_limits is not None else None,
    )
    empty = [stage for stage in range(plan.num_stages) if len(plan.layers_of(stage)) == 0]
    if empty:
        raise ValueError(
            f"the partition {list(plan.boundaries)} leaves stage(s) {empty} without layers; every "
            f"stage needs at least one layer: use fewer stages or other boundaries"
        )
    return plan


def with_parameter_counts(plan: PartitionPlan, layers: Sequence[Layer]) -> PartitionPlan:
    """``plan`` with per-layer trainable parameter counts for its table, described on meta."""
    if plan.parameters is not None:
        return plan
    counts = tuple(info.trainable_params for info in describe_layers(layers))
    return dataclasses.replace(plan, parameters=counts)
