"""A process-independent summary of what a rank is about to build, compared across ranks.

Every rank of a pipeline must start from the same layer list, topology and partition: a rank
that disagrees would build a different stage and hang (or silently diverge) at the first
send/recv. The summary is plain strings, so ranks can exchange and compare it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipespec import Layer, LayerSpec, TiedLayerSpec

__all__ = [
    "ConstructionFingerprint",
    "first_difference",
    "layer_signature",
    "qualified_name",
    "value_signature",
]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def qualified_name(obj: object) -> str:
    """``module.QualName`` of a class or function: the same in every process."""
    module = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}"


def _stable_repr(value: object) -> str:
    # Default reprs embed memory addresses, which differ between processes.
    return _ADDRESS.sub("", repr(value))


def _tensor_signature(tensor: torch.Tensor) -> str:
    # A tensor's repr rounds its values (0.10001 and 0.10002 both print as 0.1000) and elides
    # large ones, so ranks holding different values would look alike: hash the bytes instead.
    head = f"tensor({tensor.dtype}, {tuple(tensor.shape)}"
    if tensor.is_meta or tensor.layout != torch.strided:
        return f"{head}, {tensor.layout}, {'meta' if tensor.is_meta else _stable_repr(tensor)})"
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return f"{head}, sha256 {digest})"


def value_signature(value: object) -> str:
    """A process-independent, value-exact description of one constructor argument.

    Tensors are described by dtype, shape and a hash of their bytes; containers element by
    element; classes and functions by qualified name; anything else by its repr, without
    memory addresses.
    """
    if isinstance(value, torch.Tensor):
        return _tensor_signature(value)
    if isinstance(value, (list, tuple)):
        items = ", ".join(value_signature(item) for item in value)
        return f"{type(value).__name__}[{items}]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{key!r}: {value_signature(item)}" for key, item in value.items())
        return f"{type(value).__name__}{{{items}}}"
    if isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
        return qualified_name(value)
    return _stable_repr(value)


def _call_signature(typename: type, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    parts = [value_signature(value) for value in args]
    parts += [f"{name}={value_signature(value)}" for name, value in kwargs.items()]
    return f"{qualified_name(typename)}({', '.join(parts)})"


def layer_signature(layer: Layer) -> str:
    """A process-independent description of one layer (class, arguments, tie key)."""
    if isinstance(layer, TiedLayerSpec):
        forward_fn = "" if layer.forward_fn is None else qualified_name(layer.forward_fn)
        call = _call_signature(layer.typename, layer.module_args, layer.module_kwargs)
        return f"tied[{layer.key}] {call} attrs={layer.tied_weight_attr} forward_fn={forward_fn}"
    if isinstance(layer, LayerSpec):
        return f"spec {_call_signature(layer.typename, layer.module_args, layer.module_kwargs)}"
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
    seeding: str = ""
    """How layers are seeded (``seed_layers``, ``base_seed``, ``seed_fn``): changes weights."""


def first_difference(mine: ConstructionFingerprint, theirs: ConstructionFingerprint) -> str:
    """The first field in which two fingerprints differ, for an error message."""
    for index, (a, b) in enumerate(zip(mine.layers, theirs.layers, strict=False)):
        if a != b:
            return f"layer {index} differs: {a!r} vs {b!r}"
    if len(mine.layers) != len(theirs.layers):
        return f"the layer lists have {len(mine.layers)} vs {len(theirs.layers)} layers"
    if mine.topology != theirs.topology:
        return f"the topologies differ: {mine.topology} vs {theirs.topology}"
    if mine.seeding != theirs.seeding:
        return f"the seeding differs: {mine.seeding} vs {theirs.seeding}"
    return f"the partitions differ: {mine.partition} vs {theirs.partition}"
