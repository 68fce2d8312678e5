"""Validation of PipelineModule's arguments, before any collective communication.

A configuration error found after the first collective call is a hang on the other ranks, so
everything that can be checked locally is checked here, and every message names the bad value
and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipemodule._device import resolve_device
from pipemodule._ties import TiedKey, index_tied_layers
from pipepartition import PartitionMethod, Profile, parse_method
from pipespec import Layer, LayerSpec
from pipetopo import PipeDataParallelTopology, ProcessTopology

__all__ = ["PipelineConfig", "validate_config"]


@dataclass(frozen=True, eq=False)
class PipelineConfig:
    """PipelineModule's arguments after validation, in the types the rest of the code uses."""

    layers: tuple[Layer, ...]
    num_stages: int
    topology: ProcessTopology
    method: PartitionMethod
    tied_keys: dict[str, TiedKey]
    device: torch.device
    process_group: dist.ProcessGroup | None
    stage_speeds: tuple[float, ...] | None
    stage_memory_limits: tuple[float, ...] | None
    profile_input: Any

    @property
    def needs_profile(self) -> bool:
        return isinstance(self.method, Profile)


def _require_initialised() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "PipelineModule needs torch.distributed: call torch.distributed.init_process_group() "
            "first (launch with torchrun; a world of one process works too)"
        )


def _check_layers(layers: Iterable[Layer]) -> tuple[Layer, ...]:
    from pipemodule._module import PipelineModule  # the class being constructed

    candidate: object = layers  # typed as an iterable, but users pass anything
    if isinstance(candidate, (str, bytes)) or not isinstance(candidate, Iterable):
        raise TypeError(
            f"layers={layers!r} is not an iterable of layers; pass a list of LayerSpec, "
            f"TiedLayerSpec, nn.Module or callables (an nn.Sequential works too)"
        )
    checked = tuple(layers)
    if not checked:
        raise ValueError("layers is empty: a pipeline needs at least one layer per stage")
    for index, layer in enumerate(checked):
        if isinstance(layer, PipelineModule):
            raise ValueError(
                f"layer {index} is a PipelineModule; nested pipelines are not supported: pass its "
                f"layer list instead"
            )
        if isinstance(layer, type) and issubclass(layer, torch.nn.Module):
            raise TypeError(
                f"layer {index} is the class {layer.__name__}, not a layer; wrap it as "
                f"LayerSpec({layer.__name__}, ...) or pass a built module"
            )
        if not (isinstance(layer, (LayerSpec, torch.nn.Module)) or callable(layer)):
            raise TypeError(
                f"layer {index} is {layer!r} (a {type(layer).__name__}); layers must be "
                f"LayerSpec, TiedLayerSpec, torch.nn.Module or callables"
            )
    return checked


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


def _resolve_topology(
    num_stages: int | None, topology: ProcessTopology | None, world_size: int
) -> ProcessTopology:
    if topology is None and num_stages is None:
        raise ValueError(
            "give num_stages (the pipeline depth; the rest of the world becomes data "
            "parallelism) or topology (a pipetopo.ProcessTopology with a 'pipe' axis)"
        )
    if topology is not None:
        if not isinstance(topology, ProcessTopology):
            raise TypeError(
                f"topology={topology!r} is not a pipetopo.ProcessTopology; build one with "
                f"PipeDataParallelTopology(num_pp, num_dp) or PipeModelDataParallelTopology"
            )
        if "pipe" not in topology.get_axis_names():
            raise ValueError(
                f"topology {topology!r} has no 'pipe' axis; a pipeline topology needs one, e.g. "
                f"ProcessTopology(axes=['pipe', 'data'], dims=[...])"
            )
        if num_stages is not None and num_stages != topology.get_dim("pipe"):
            raise ValueError(
                f"num_stages={num_stages} contradicts the topology's pipe dimension "
                f"{topology.get_dim('pipe')}; pass only one of them"
            )
        if topology.world_size() != world_size:
            raise ValueError(
                f"the topology {topology!r} has {topology.world_size()} ranks but the process "
                f"group has {world_size}; the product of its dims must equal the world size"
            )
        return topology
    stages = _check_positive_int("num_stages", num_stages)
    if world_size % stages != 0:
        raise ValueError(
            f"num_stages={stages} does not divide the world size {world_size}; use a divisor of "
            f"{world_size} (the remaining factor becomes data parallelism)"
        )
    return PipeDataParallelTopology(num_pp=stages, num_dp=world_size // stages)


def _per_stage(
    name: str, values: Sequence[float] | None, num_stages: int
) -> tuple[float, ...] | None:
    if values is None:
        return None
    checked = tuple(values)
    if len(checked) != num_stages:
        raise ValueError(
            f"{name} has {len(checked)} entries but there are {num_stages} stages; give one "
            f"value per stage"
        )
    return checked


def validate_config(
    *,
    layers: Iterable[Layer],
    num_stages: int | None,
    topology: ProcessTopology | None,
    loss_fn: Callable[..., Any] | None,
    seed_layers: bool,
    seed_fn: Callable[[int], object] | None,
    base_seed: int,
    partition_method: str | PartitionMethod,
    activation_checkpoint_interval: int,
    activation_checkpoint_func: Callable[..., Any],
    checkpointable_layers: Sequence[str] | None,
    device: torch.device | str | int | None,
    process_group: dist.ProcessGroup | None,
    stage_speeds: Sequence[float] | None,
    stage_memory_limits: Sequence[float] | None,
    profile_input: Any,
) -> PipelineConfig:
    """Check every argument locally; raise before any rank talks to another."""
    _require_initialised()
    checked_layers = _check_layers(layers)
    world_size = dist.get_world_size(process_group)
    resolved_topology = _resolve_topology(num_stages, topology, world_size)
    stages = resolved_topology.get_dim("pipe")
    if len(checked_layers) < stages:
        raise ValueError(
            f"{len(checked_layers)} layers cannot fill {stages} pipeline stages: every stage "
            f"needs at least one layer; use at most {len(checked_layers)} stages"
        )
    method = parse_method(partition_method)
    if isinstance(method, Profile) and profile_input is None:
        raise ValueError(
            "partition_method='profile' measures each layer on a sample input: pass "
            "profile_input=<a sample batch for the first layer>"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(outputs, labels)")
    if not isinstance(seed_layers, bool):
        raise TypeError(f"seed_layers={seed_layers!r} must be a bool")
    if seed_fn is not None and not callable(seed_fn):
        raise TypeError(f"seed_fn={seed_fn!r} is not callable; pass a function seed_fn(seed)")
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ValueError(f"base_seed={base_seed!r} must be an int >= 0")
    if (
        isinstance(activation_checkpoint_interval, bool)
        or not isinstance(activation_checkpoint_interval, int)
        or activation_checkpoint_interval < 0
    ):
        raise ValueError(
            f"activation_checkpoint_interval={activation_checkpoint_interval!r} must be an int "
            f">= 0 (0 disables activation checkpointing)"
        )
    if not callable(activation_checkpoint_func):
        raise TypeError(
            f"activation_checkpoint_func={activation_checkpoint_func!r} is not callable; pass "
            f"fn(function, *args), e.g. torch.utils.checkpoint.checkpoint"
        )
    if checkpointable_layers is not None and (
        isinstance(checkpointable_layers, str)
        or not all(isinstance(name, str) for name in checkpointable_layers)
    ):
        raise TypeError(
            f"checkpointable_layers={checkpointable_layers!r} must be a list of layer class "
            f"names, e.g. ['TransformerBlock']"
        )
    return PipelineConfig(
        layers=checked_layers,
        num_stages=stages,
        topology=resolved_topology,
        method=method,
        tied_keys=index_tied_layers(checked_layers),
        device=resolve_device(device),
        process_group=process_group,
        stage_speeds=_per_stage("stage_speeds", stage_speeds, stages),
        stage_memory_limits=_per_stage("stage_memory_limits", stage_memory_limits, stages),
        profile_input=profile_input,
    )
