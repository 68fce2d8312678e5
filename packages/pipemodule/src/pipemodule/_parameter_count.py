"""Counting a pipeline's parameters once, with tied modules counted once."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pipemodule._planning import describe_layers
from pipespec import Layer, TiedLayerSpec

__all__ = ["count_parameters"]


def count_parameters(layers: Iterable[Layer], *, trainable_only: bool = False) -> int:
    """Parameters of the whole pipeline: each tie key and each module object counted once.

    Works from the layer list alone (specs are described on the meta device), so every rank
    gets the total without communication and without building the other stages.
    """
    layer_list = list(layers)
    infos = describe_layers(layer_list)
    seen_keys: set[str] = set()
    seen_modules: set[int] = set()
    total = 0
    for layer, info in zip(layer_list, infos, strict=True):
        if isinstance(layer, TiedLayerSpec):
            if layer.key in seen_keys:
                continue
            seen_keys.add(layer.key)
        elif isinstance(layer, torch.nn.Module):
            if id(layer) in seen_modules:
                continue
            seen_modules.add(id(layer))
        total += info.trainable_params if trainable_only else info.num_params
    return total
