"""The one way a layer becomes something to run: used for the local stage and for profiling."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipemodule._stage.seeding import Seeding
from pipespec import Layer, LayerSpec, TiedLayerSpec

__all__ = ["BuiltStage", "ForwardFunc", "LayerBuilder", "TiedForward"]

ForwardFunc = Callable[[Any], Any]
"""One step of a stage's forward: a module, a tied module's ``forward_fn`` or a callable."""


class TiedForward:
    """A tied module used through a ``forward_fn``: calling it runs ``forward_fn(module, x)``."""

    def __init__(self, forward_fn: Callable[[torch.nn.Module, Any], Any], module: torch.nn.Module):
        self.forward_fn = forward_fn
        self.module = module

    def __call__(self, inputs: Any) -> Any:
        return self.forward_fn(self.module, inputs)

    def __repr__(self) -> str:
        name = getattr(self.forward_fn, "__qualname__", repr(self.forward_fn))
        return f"TiedForward({name}, {type(self.module).__name__})"


@dataclass
class BuiltStage:
    """What building a stage's layers produced, in the order the forward pass runs them."""

    forward_funcs: list[ForwardFunc] = field(default_factory=list)
    modules: dict[int, torch.nn.Module] = field(default_factory=dict)
    """Global layer index -> module, for every layer that is a module of its own (not tied)."""
    tied_modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    """Tie key -> the stage's one module for it."""


@dataclass(frozen=True)
class LayerBuilder:
    """Builds layers of one layer list on one device, each from its own seed.

    Attributes:
        layers: the whole layer list (global indices).
        tie_first_layers: the first layer index of every tie key: by default a tied module is
            built from its key's first occurrence's seed, whichever stage builds it, so every
            copy starts identical even before the owner's values are broadcast.
        seeding: how layers are seeded.
    """

    layers: Sequence[Layer]
    tie_first_layers: Mapping[str, int]
    seeding: Seeding

    def build(self, index: int, tied: MutableMapping[str, torch.nn.Module]) -> ForwardFunc:
        """Layer ``index`` ready to run; a tied module comes from (or goes into) ``tied``."""
        layer = self.layers[index]
        device = self.seeding.device
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in tied:
                # seed_layers seeds by the occurrence being built, as DeepSpeed does.
                first = self.tie_first_layers[layer.key]
                with self.seeding.building(index if self.seeding.seed_layers else first):
                    tied[layer.key] = layer.build(device=device)
            module = tied[layer.key]
            return module if layer.forward_fn is None else TiedForward(layer.forward_fn, module)
        if isinstance(layer, LayerSpec):
            with self.seeding.building(index):
                return layer.build(device=device)
        if isinstance(layer, torch.nn.Module):
            return layer.to(device)
        return layer

    def build_stage(
        self, indices: Iterable[int], tied: MutableMapping[str, torch.nn.Module] | None = None
    ) -> BuiltStage:
        """Every layer of ``indices``, tied occurrences sharing one module per key.

        ``tied`` holds the tied modules of the rank's other stages: the stages of one rank share
        one module per key, so a tie between them needs no communication.
        """
        stage = BuiltStage()
        shared = {} if tied is None else tied
        for index in indices:
            built = self.build(index, shared)
            layer = self.layers[index]
            if isinstance(layer, TiedLayerSpec):
                stage.tied_modules[layer.key] = shared[layer.key]
            stage.forward_funcs.append(built)
            if isinstance(built, torch.nn.Module) and not isinstance(layer, TiedLayerSpec):
                stage.modules[index] = built
        return stage
