"""A process-independent summary of what a rank is about to build, compared across ranks.

Every rank of a pipeline must start from the same layer list, topology and partition: a rank
that disagrees would build a different stage and hang (or silently diverge) at the first
send/recv. The summary is plain strings, so ranks can exchange and compare it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipespec import Layer, LayerSpec, TiedLayerSpec

__all__ = ["ConstructionFingerprint", "first_difference", "layer_signature", "qualified_name"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def qualified_name(obj: object) -> str:
    """``module.QualName`` of a class or function: the same in every process."""
    module = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}"


def _stable_repr(value: object) -> str:
    # Default reprs embed memory addresses, which differ between processes.
    return _ADDRESS.sub("", repr(value))


def layer_signature(layer: Layer) -> str:
    """A process-independent description of one layer (class, arguments, tie key)."""
    if isinstance(layer, TiedLayerSpec):
        forward_fn = "" if layer.forward_fn is None else qualified_name(layer.forward_fn)
        return (
            f"tied[{layer.key}] {qualified_name(layer.typename)} {_stable_repr(layer)} "
            f"attrs={layer.tied_weight_attr} forward_fn={forward_fn}"
        )
    if isinstance(layer, LayerSpec):
        return f"spec {qualified_name(layer.typename)} {_stable_repr(layer)}"
    if isinstance(layer, torch.nn.Module):
        shapes = ",".join(f"{n}:{tuple(p.shape)}" for n, p in layer.named_parameters())
        return f"module {qualified_name(type(layer))} params=[{shapes}]"
    return f"callable {qualified_name(layer)}"


@dataclass(frozen=True)
class ConstructionFingerprint:
    """What one rank is about to build; equal on every rank of a consistent job."""

    layers: tuple[str, ...]
    topology: str
    partition: str
    """The resulting boundaries, or the partition method while it still has to measure."""


def first_difference(mine: ConstructionFingerprint, theirs: ConstructionFingerprint) -> str:
    """The first field in which two fingerprints differ, for an error message."""
    for index, (a, b) in enumerate(zip(mine.layers, theirs.layers, strict=False)):
        if a != b:
            return f"layer {index} differs: {a!r} vs {b!r}"
    if len(mine.layers) != len(theirs.layers):
        return f"the layer lists have {len(mine.layers)} vs {len(theirs.layers)} layers"
    if mine.topology != theirs.topology:
        return f"the topologies differ: {mine.topology} vs {theirs.topology}"
    return f"the partitions differ: {mine.partition} vs {theirs.partition}"
