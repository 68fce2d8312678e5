"""Display names of layers, found without constructing anything."""

from __future__ import annotations

import functools

import torch
from pipespec import Layer, LayerSpec

__all__ = ["layer_name"]


def layer_name(layer: Layer) -> str:
    """The class name of a spec or module, or the ``__name__`` of a callable.

    These are the names ``partition_method='type:REGEX'`` matches, as in DeepSpeed.
    """
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, torch.nn.Module):
        return type(layer).__name__
    if isinstance(layer, functools.partial):
        return layer_name(layer.func)
    name = getattr(layer, "__name__", None)
    return name if isinstance(name, str) else type(layer).__name__
