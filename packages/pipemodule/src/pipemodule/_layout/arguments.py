"""Checks of the arguments a pipeline layout is computed from; local, before any communication."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from pipemodule._checks import positive_int
from pipespec import Layer, LayerSpec
from pipetopo import PipeDataParallelTopology, ProcessTopology

__all__ = ["check_layers", "per_stage", "resolve_topology"]


def check_layers(layers: Iterable[Layer]) -> tuple[Layer, ...]:
    """``layers`` as a tuple, if every entry is a spec, a module or a callable."""
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


def resolve_topology(
    num_stages: int | None, topology: ProcessTopology | None, world_size: int | None
) -> ProcessTopology:
    """The topology given, or pipe x data over ``world_size`` (default: ``num_stages``) ranks."""
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
        if world_size is not None and topology.world_size() != world_size:
            raise ValueError(
                f"the topology {topology!r} has {topology.world_size()} ranks but the process "
                f"group has {world_size}; the product of its dims must equal the world size"
            )
        return topology
    stages = positive_int("num_stages", num_stages)
    ranks = stages if world_size is None else positive_int("world_size", world_size)
    if ranks % stages != 0:
        raise ValueError(
            f"num_stages={stages} does not divide the world size {ranks}; use a divisor of "
            f"{ranks} (the remaining factor becomes data parallelism)"
        )
    return PipeDataParallelTopology(num_pp=stages, num_dp=ranks // stages)


def per_stage(
    name: str, values: Sequence[float] | None, num_stages: int
) -> tuple[float, ...] | None:
    """``values`` as a tuple of one entry per stage, or None."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}={values!r} is not a sequence; give one number per stage")
    checked = tuple(values)
    if len(checked) != num_stages:
        entries = "1 entry" if len(checked) == 1 else f"{len(checked)} entries"
        raise ValueError(
            f"{name} has {entries} but there are {num_stages} stages; give one value per stage"
        )
    return checked
