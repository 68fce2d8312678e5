"""Every stage's input and output shapes, derived on the meta device from one micro-batch.

torch's ``PipelineStage`` either receives complete example inputs and outputs (static
metadata) or infers them at the first step by running later stages on *uninitialised* buffers:
integer ids received that way index out of range at random, and a shape that changes between
steps aborts a rank. Here the spec list itself is run on the meta device, from a micro-batch's
shapes and dtypes alone: no memory, no communication, the same answer on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from pipemodule._layout.layout import PipelineLayout
from pipespec import LayerSpec, TiedLayerSpec

__all__ = [
    "MetaLayer",
    "StageShapes",
    "describe_values",
    "meta_layer",
    "meta_like",
    "meta_sample",
    "meta_tensors_only",
    "micro_batch_of",
    "stage_shapes",
]


@dataclass(frozen=True)
class StageShapes:
    """What one stage receives and sends, as meta tensors (shape, dtype, requires_grad)."""

    stage: int
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


def meta_like(value: Any, *, requires_grad: bool | None = None) -> Any:
    """``value`` (a tensor or nested tuple/list of tensors) as meta tensors of equal shape."""
    if isinstance(value, torch.Tensor):
        meta = torch.empty(value.shape, dtype=value.dtype, device="meta")
        wants = value.requires_grad if requires_grad is None else requires_grad
        return meta.requires_grad_(wants and (meta.is_floating_point() or meta.is_complex()))
    if isinstance(value, (tuple, list)):
        return tuple(meta_like(item, requires_grad=requires_grad) for item in value)
    raise TypeError(
        f"a stage input of type {type(value).__name__} cannot cross a pipeline stage; pass "
        f"tensors, or tuples of tensors"
    )


def micro_batch_of(batch: Any, n_microbatches: int) -> Any:
    """The first micro-batch of ``batch`` as a schedule splits it (``tensor_split`` on dim 0)."""
    if isinstance(batch, torch.Tensor):
        return torch.tensor_split(batch, n_microbatches)[0]
    if isinstance(batch, (tuple, list)):
        return tuple(micro_batch_of(item, n_microbatches) for item in batch)
    return batch


def meta_sample(key: Any) -> Any:
    """Meta tensors shaped as ``key`` says: ``(shape, dtype)``, or tuples of such keys."""
    if len(key) == 2 and isinstance(key[1], torch.dtype):
        return torch.empty(key[0], dtype=key[1], device="meta")
    return tuple(meta_sample(item) for item in key)


def describe_values(value: Any) -> str:
    """``int64[4, 16]`` or ``(float32[4, 16, 64], int64[4, 16])``, for messages."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(size) for size in value.shape)}]"
    if isinstance(value, (tuple, list)):
        return f"({', '.join(describe_values(item) for item in value)})"
    return type(value).__name__


@contextmanager
def meta_tensors_only() -> Iterator[None]:
    # Layers that create tensors in forward (masks, position ids) without a device get meta
    # ones too; the RNG is left as it was.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        yield


@dataclass(frozen=True)
class MetaLayer:
    """One layer ready to run on meta, and the parameters and buffers it runs with.

    ``state`` lets a caller tell a layer's own tensors from the activations it saves.
    """

    call: Callable[[Any], Any]
    state: tuple[torch.Tensor, ...]
    module: torch.nn.Module | None = None


def _meta_call(module: torch.nn.Module) -> MetaLayer:
    """Run a built module with meta copies of its parameters and buffers (no copy of data)."""
    state = {
        name: torch.empty_like(tensor, device="meta").requires_grad_(tensor.requires_grad)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
    }
    return MetaLayer(lambda x: functional_call(module, state, (x,)), tuple(state.values()), module)


def _state_of(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    return (*module.parameters(), *module.buffers())


def stage_shapes(layout: PipelineLayout, sample: Any) -> tuple[StageShapes, ...]:
    """Each stage's inputs and outputs for a first-layer input shaped like ``sample``.

    ``sample`` is one micro-batch (its values are never read); integer inputs stay integer,
    floating outputs of a stage carry ``requires_grad`` as autograd would. Tuples between
    stages keep their order.

    Raises:
        TypeError: a stage returns something other than tensors or tuples of tensors.
        RuntimeError: a layer fails on the meta device (the message names it and the input).
    """
    x: Any = meta_like(sample, requires_grad=False)
    tied: dict[str, torch.nn.Module] = {}
    shapes: list[StageShapes] = []
    with meta_tensors_only():
        for stage in range(layout.num_stages):
            inputs = x if isinstance(x, tuple) else (x,)
            for index in layout.layers_of(stage):
                call = _meta_forward(layout, index, tied)
                try:
                    x = call(x)
                except Exception as error:
                    raise RuntimeError(
                        f"layer {index} ({type(layout.layers[index]).__name__} "
                        f"{layout.layers[index]!r}) failed on the meta device for input "
                        f"{describe_values(x)}: {error}; its forward must run on any device "
                        f"(create tensors with device=x.device)"
                    ) from error
            x = meta_like(x)  # checks that only tensors cross the boundary
            shapes.append(StageShapes(stage, inputs, x if isinstance(x, tuple) else (x,)))
    return tuple(shapes)


def _meta_forward(
    layout: PipelineLayout, index: int, tied: dict[str, torch.nn.Module]
) -> Callable[[Any], Any]:
    return meta_layer(layout, index, tied).call


def meta_layer(layout: PipelineLayout, index: int, tied: dict[str, torch.nn.Module]) -> MetaLayer:
    """Layer ``index`` of ``layout`` built (or copied) on meta; call inside meta_tensors_only.

    ``tied`` caches one module per tie key, as every stage holding the key builds one.
    """
    layer = layout.layers[index]
    if isinstance(layer, TiedLayerSpec):
        if layer.key not in tied:
            tied[layer.key] = layer.build(device="meta")
        module = tied[layer.key]
        if layer.forward_fn is None:
            return MetaLayer(module, _state_of(module), module)
        forward_fn = layer.forward_fn
        return MetaLayer(lambda x: forward_fn(module, x), _state_of(module), module)
    if isinstance(layer, LayerSpec):
        built = layer.build(device="meta")
        return MetaLayer(built, _state_of(built), built)
    if isinstance(layer, torch.nn.Module):
        return _meta_call(layer)
    return MetaLayer(layer, ())
