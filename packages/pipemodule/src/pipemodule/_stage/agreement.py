"""Cross-rank agreement on what is being built, before anything is built.

Every rank of a pipeline must start from the same layer list, topology and partition: a rank
that disagrees would build a different stage and hang (or silently diverge) at the first
send/recv. Each rank summarises its inputs as a fingerprint; the ranks exchange fingerprints and
every rank raises the same error, naming the first difference, if any two disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipemodule._collective import gather_objects
from pipespec import Layer, LayerSpec, TiedLayerSpec

__all__ = ["ConstructionFingerprint", "agree_on_construction", "layer_signature"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _qualified_name(obj: object) -> str:
    module = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}"


def _stable_repr(value: object) -> str:
    # Default reprs embed memory addresses, which differ between processes.
    return _ADDRESS.sub("", repr(value))


def layer_signature(layer: Layer) -> str:
    """A process-independent description of one layer (class, arguments, tie key)."""
    if isinstance(layer, TiedLayerSpec):
        forward_fn = "" if layer.forward_fn is None else _qualified_name(layer.forward_fn)
        return (
            f"tied[{layer.key}] {_qualified_name(layer.typename)} {_stable_repr(layer)} "
            f"attrs={layer.tied_weight_attr} forward_fn={forward_fn}"
        )
    if isinstance(layer, LayerSpec):
        return f"spec {_qualified_name(layer.typename)} {_stable_repr(layer)}"
    if isinstance(layer, torch.nn.Module):
        shapes = ",".join(f"{n}:{tuple(p.shape)}" for n, p in layer.named_parameters())
        return f"module {_qualified_name(type(layer))} params=[{shapes}]"
    return f"callable {_qualified_name(layer)}"


@dataclass(frozen=True)
class ConstructionFingerprint:
    """What one rank is about to build; compared across ranks."""

    layers: tuple[str, ...]
    topology: str
    partition: str
    """The partition method and its parameters, or the resulting boundaries."""


def _first_difference(mine: ConstructionFingerprint, theirs: ConstructionFingerprint) -> str:
    for index, (a, b) in enumerate(zip(mine.layers, theirs.layers, strict=False)):
        if a != b:
            return f"layer {index} differs: {a!r} vs {b!r}"
    if len(mine.layers) != len(theirs.layers):
        return f"the layer lists have {len(mine.layers)} vs {len(theirs.layers)} layers"
    if mine.topology != theirs.topology:
        return f"the topologies differ: {mine.topology} vs {theirs.topology}"
    return f"the partitions differ: {mine.partition} vs {theirs.partition}"


def agree_on_construction(
    fingerprint: ConstructionFingerprint, seed: int, group: dist.ProcessGroup | None
) -> int:
    """Check that every rank of ``group`` has the same fingerprint; return rank 0's ``seed``.

    Collective over ``group``: every rank must call it. On a mismatch every rank raises the same
    ``RuntimeError``, which names the first rank that differs from rank 0 and the first
    difference, so no rank goes on to build a stage its peers do not expect.
    """
    gathered: list[tuple[ConstructionFingerprint, int]] = gather_objects((fingerprint, seed), group)
    reference, reference_seed = gathered[0]
    for index, (other, _) in enumerate(gathered):
        if other != reference:
            rank = index if group is None else dist.get_global_rank(group, index)
            reference_rank = 0 if group is None else dist.get_global_rank(group, 0)
            raise RuntimeError(
                f"ranks disagree about the pipeline to build: rank {rank} vs rank "
                f"{reference_rank}: {_first_difference(other, reference)}. Every rank must "
                f"construct PipelineModule with the same layers, topology and partition method "
                f"(same code and arguments; no rank-dependent values)"
            )
    return int(reference_seed)
