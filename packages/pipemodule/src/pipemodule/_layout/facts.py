"""Per-layer facts, described once on the meta device; which layers hold a module of their own."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence

import torch

from pipespec import Layer, LayerInfo, LayerSpec, TiedLayerSpec, describe

__all__ = ["count_parameters", "describe_layers", "holding_identity", "unique_layers"]


def describe_layers(layers: Sequence[Layer]) -> tuple[LayerInfo, ...]:
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
    return tuple(infos)


def holding_identity(layer: Layer) -> Hashable | None:
    """Layers with equal identities share one module where they meet; None: never shared.

    Every occurrence of a tie key shares the stage's one tied module, and one module object
    listed twice is registered once; a ``LayerSpec`` builds a new module each time and a plain
    callable holds nothing.
    """
    if isinstance(layer, TiedLayerSpec):
        return ("tied", layer.key)
    if isinstance(layer, torch.nn.Module):
        return ("module", id(layer))
    return None


def unique_layers(layers: Sequence[Layer], indices: Iterable[int] | None = None) -> Iterator[int]:
    """The indices among ``indices`` (default: all) whose layer holds its module once.

    The first occurrence of each tie key and of each module object is yielded, later ones are
    skipped: summing over the result counts every held module once.
    """
    seen: set[Hashable] = set()
    for index in range(len(layers)) if indices is None else indices:
        identity = holding_identity(layers[index])
        if identity is not None:
            if identity in seen:
                continue
            seen.add(identity)
        yield index


def count_parameters(layers: Iterable[Layer], *, trainable_only: bool = False) -> int:
    """Parameters of the whole pipeline: each tie key and each module object counted once.

    Works from the layer list alone (specs are described on the meta device), so every rank
    gets the total without communication and without building the other stages.
    """
    layer_list = list(layers)
    infos = describe_layers(layer_list)
    return sum(
        infos[index].trainable_params if trainable_only else infos[index].num_params
        for index in unique_layers(layer_list)
    )
