"""Cheap, immutable layer specifications for pipeline-parallel PyTorch models."""

from pipespec.__about__ import __version__
from pipespec._describe import LayerInfo, LayerKind, describe, layer_name
from pipespec._layer import Layer
from pipespec._layer_spec import LayerSpec
from pipespec._tied_attr import resolve_tied_attr
from pipespec._tied_layer_spec import TiedLayerSpec

__all__ = [
    "Layer",
    "LayerInfo",
    "LayerKind",
    "LayerSpec",
    "TiedLayerSpec",
    "__version__",
    "describe",
    "layer_name",
    "resolve_tied_attr",
]
