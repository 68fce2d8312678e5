"""describe(): what a layer is and what its parameters cost, without allocating them."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

import torch

from pipespec._layer import Layer
from pipespec._layer_spec import LayerSpec
from pipespec._rng import preserved_global_rng
from pipespec._tied_layer_spec import TiedLayerSpec


class LayerKind(str, Enum):
    """Which of the four forms of :data:`Layer` a layer has; compares equal to its value."""

    SPEC = "spec"
    TIED = "tied"
    MODULE = "module"
    CALLABLE = "callable"

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return format(self.value, format_spec)


@dataclass(frozen=True)
class LayerInfo:
    """A layer's name and parameter cost, as reported by :func:`describe`.

    Attributes:
        name: the module class name, or the ``__name__`` of a callable.
        kind: which form the layer has.
        num_params: number of parameter elements, each shared parameter counted once.
        trainable_params: the part of ``num_params`` with ``requires_grad``.
        param_bytes: bytes those parameters occupy at their dtypes.
        tie_key: the tie key of a :class:`TiedLayerSpec`, else ``None``.
    """

    name: str
    kind: LayerKind
    num_params: int
    trainable_params: int
    param_bytes: int
    tie_key: str | None = None


def describe(layer: Layer) -> LayerInfo:
    """Report a layer's name, kind and parameter counts.

    A spec is built on the ``meta`` device, so no parameter memory is allocated, and every global
    random number generator (torch, Python's ``random``, numpy) is restored afterwards, so
    describing a layer never changes the weights that are initialised later. A built module is
    inspected as it is; a plain callable has no parameters.

    Raises:
        TypeError: ``layer`` is none of the above, or is a module class rather than a spec.
    """
    if isinstance(layer, LayerSpec):
        kind = LayerKind.TIED if isinstance(layer, TiedLayerSpec) else LayerKind.SPEC
        module = _build_on_meta(layer)
        return _module_info(
            layer_name(layer),
            kind,
            module,
            layer.key if isinstance(layer, TiedLayerSpec) else None,
        )
    if isinstance(layer, torch.nn.Module):
        return _module_info(layer_name(layer), LayerKind.MODULE, layer, None)
    if isinstance(layer, type) and issubclass(layer, torch.nn.Module):
        raise TypeError(
            f"{layer.__name__} is a module class, which as a layer would construct a new module "
            f"from every input; wrap it as LayerSpec({layer.__name__}, ...) or pass a built module"
        )
    if callable(layer):
        return LayerInfo(
            name=layer_name(layer),
            kind=LayerKind.CALLABLE,
            num_params=0,
            trainable_params=0,
            param_bytes=0,
        )
    raise TypeError(
        f"describe() takes a LayerSpec, TiedLayerSpec, torch.nn.Module or callable, got {layer!r} "
        f"(a {type(layer).__name__})"
    )


def _build_on_meta(spec: LayerSpec) -> torch.nn.Module:
    with preserved_global_rng():
        try:
            return spec.build(device="meta")
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(
                    f"pipespec.describe() built {spec!r} on the meta device to count its "
                    f"parameters; its __init__ must not read tensor values or copy tensors to "
                    f"another device"
                )
            raise


def _module_info(
    name: str, kind: LayerKind, module: torch.nn.Module, tie_key: str | None
) -> LayerInfo:
    # parameters() yields a parameter shared by several submodules only once.
    parameters = list(module.parameters())
    return LayerInfo(
        name=name,
        kind=kind,
        num_params=sum(p.numel() for p in parameters),
        trainable_params=sum(p.numel() for p in parameters if p.requires_grad),
        param_bytes=sum(p.numel() * p.element_size() for p in parameters),
        tie_key=tie_key,
    )


def layer_name(layer: Layer) -> str:
    """A layer's display name, found without constructing anything.

    The class name of a spec or module, or the ``__name__`` of a callable (through any
    ``functools.partial``); the names that ``partition_method='type:REGEX'`` matches.
    """
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, torch.nn.Module):
        return type(layer).__name__
    function: object = layer
    while isinstance(function, functools.partial):
        function = function.func
    name = getattr(function, "__name__", None)
    return name if isinstance(name, str) else type(function).__name__
