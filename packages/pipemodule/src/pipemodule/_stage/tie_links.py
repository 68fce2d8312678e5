"""Tied layers: which layers share a key, and keeping the shared tensors identical across stages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipespec import Layer, TiedLayerSpec, resolve_tied_attr

__all__ = ["TieComm", "TiedKey", "index_tied_layers"]


@dataclass(frozen=True)
class TiedKey:
    """Every occurrence of one tie key in the layer list."""

    key: str
    layer_indices: tuple[int, ...]
    spec: TiedLayerSpec
    """The first occurrence: all occurrences build the same module (checked)."""

    @property
    def first_layer(self) -> int:
        return self.layer_indices[0]


def index_tied_layers(layers: Sequence[Layer]) -> dict[str, TiedKey]:
    """Group the tied layers of ``layers`` by key, in sorted key order.

    Every occurrence of a key shares one module per stage, so all of them must describe the same
    module: a different class, arguments or ``tied_weight_attr`` is an error (DeepSpeed silently
    builds the first and ignores the rest). ``forward_fn`` may differ: that is how an embedding
    is reused as the output projection.
    """
    occurrences: dict[str, list[int]] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, TiedLayerSpec):
            occurrences.setdefault(layer.key, []).append(index)
    tied: dict[str, TiedKey] = {}
    for key in sorted(occurrences):
        indices = occurrences[key]
        first = layers[indices[0]]
        assert isinstance(first, TiedLayerSpec)  # by construction of `occurrences`
        for index in indices[1:]:
            other = layers[index]
            assert isinstance(other, TiedLayerSpec)
            if not (
                first.builds_same_module(other) and first.tied_weight_attr == other.tied_weight_attr
            ):
                raise ValueError(
                    f"tie key {key!r} is used by layers {indices[0]} and {index} with different "
                    f"modules: {first!r} vs {other!r}; every occurrence of a key shares one "
                    f"module, so give them the same class, arguments and tied_weight_attr (use "
                    f"forward_fn to use the module differently), or use different keys"
                )
        tied[key] = TiedKey(key=key, layer_indices=tuple(indices), spec=first)
    return tied


@dataclass(frozen=True)
class TieComm:
    """The stages of one (data, model, ...) coordinate that hold a copy of a tied module."""

    key: str
    ranks: tuple[int, ...]
    """Global ranks holding a copy, lowest stage first; the first one owns the values."""
    group: dist.ProcessGroup | None
    """None for the default group (see `pipetopo.none_if_default`)."""
    attrs: tuple[str, ...]
    module: torch.nn.Module

    def tensors(self) -> list[torch.Tensor]:
        return [resolve_tied_attr(self.module, attr) for attr in self.attrs]

    def broadcast_from_owner(self) -> None:
        """Copy the owner's values into every other copy (collective over the tie group)."""
        with torch.no_grad():
            for tensor in self.tensors():
                dist.broadcast(tensor.data, src=self.ranks[0], group=self.group)

    def sum_gradients(self) -> None:
        """Sum the tied tensors' gradients over the copies (collective over the tie group).

        A copy that received no gradient contributes zeros rather than skipping the collective,
        which would leave its peers waiting.
        """
        for tensor in self.tensors():
            if tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
            dist.all_reduce(tensor.grad, op=dist.ReduceOp.SUM, group=self.group)
