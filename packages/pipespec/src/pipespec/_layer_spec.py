"""LayerSpec: a layer's class and constructor arguments, built later where it is needed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NoReturn, TypeAlias

import torch

from pipespec._arguments import arguments_equal, arguments_hash, format_call

logger = logging.getLogger(__name__)

DeviceLike: TypeAlias = torch.device | str | int
"""Anything ``torch.device(...)`` accepts: ``"cuda:1"``, ``torch.device("meta")``, ``0``."""


class LayerSpec:
    """The class of a ``torch.nn.Module`` and the arguments to construct it with.

    A spec costs nothing until :meth:`build` is called, so a pipeline can list every layer of a
    model while each stage builds only its own layers, directly on its own device::

        >>> spec = LayerSpec(torch.nn.Linear, 10, 20, bias=False)
        >>> spec
        Linear(10, 20, bias=False)
        >>> spec.build(device="meta").weight.is_meta
        True

    Specs are immutable, compare equal when class and arguments are equal, and hash accordingly
    (hashing raises ``TypeError`` when an argument is unhashable, e.g. a list).

    Attributes (read-only, named as in ``deepspeed.pipe.LayerSpec``):
        typename: the ``torch.nn.Module`` subclass to construct.
        module_args: positional constructor arguments.
        module_kwargs: keyword constructor arguments (a read-only mapping).
    """

    __slots__ = ("module_args", "module_kwargs", "typename")

    typename: type[torch.nn.Module]
    module_args: tuple[Any, ...]
    module_kwargs: Mapping[str, Any]

    def __init__(self, typename: type[torch.nn.Module], *module_args: Any, **module_kwargs: Any):
        _check_module_class(type(self).__name__, typename)
        self._set_state(typename, module_args, dict(module_kwargs))

    def build(self, log: bool = False, device: DeviceLike | None = None) -> torch.nn.Module:
        """Construct a new module from this spec; every call returns a new instance.

        Args:
            log: log the build at INFO level through this module's logger.
            device: create the parameters and buffers directly on this device (through the
                ``torch.device`` context manager, so nothing is allocated elsewhere first).
                ``"meta"`` allocates no memory at all. ``None`` uses the current default device.
        """
        if log:
            logger.info("%sbuilding %r%s", _rank_prefix(), self, _device_suffix(device))
        if device is None:
            return self.typename(*self.module_args, **self.module_kwargs)
        with torch.device(device):
            return self.typename(*self.module_args, **self.module_kwargs)

    def builds_same_module(self, other: LayerSpec) -> bool:
        """Whether ``other`` constructs the same class with equal arguments.

        Unlike ``==`` this ignores the spec's own kind and extras (a tie key, a ``forward_fn``),
        so it tells whether two specs would build interchangeable modules.
        """
        return self.typename is other.typename and arguments_equal(
            self.module_args, self.module_kwargs, other.module_args, other.module_kwargs
        )

    def __repr__(self) -> str:
        return format_call(self.typename.__name__, self.module_args, self.module_kwargs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerSpec) or type(other) is not type(self):
            return NotImplemented
        return self.builds_same_module(other)

    def __hash__(self) -> int:
        try:
            return hash(
                (type(self), self.typename, arguments_hash(self.module_args, self.module_kwargs))
            )
        except TypeError as exc:
            raise TypeError(
                f"{self!r} cannot be hashed because one of its arguments is unhashable ({exc}); "
                f"compare specs with == instead, or pass hashable arguments (a tuple, not a list)"
            ) from exc

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(
            f"{type(self).__name__} is immutable (tried to set {name!r}); "
            f"create a new spec with the changed arguments instead"
        )

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable (tried to delete {name!r})")

    def __getstate__(self) -> dict[str, Any]:
        # A mappingproxy cannot be pickled or deep-copied, so the state carries a plain dict.
        return {
            "typename": self.typename,
            "module_args": self.module_args,
            "module_kwargs": dict(self.module_kwargs),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._set_state(state["typename"], state["module_args"], state["module_kwargs"])

    def _set_state(
        self,
        typename: type[torch.nn.Module],
        module_args: tuple[Any, ...],
        module_kwargs: dict[str, Any],
    ) -> None:
        object.__setattr__(self, "typename", typename)
        object.__setattr__(self, "module_args", tuple(module_args))
        object.__setattr__(self, "module_kwargs", MappingProxyType(module_kwargs))


def _check_module_class(spec_name: str, typename: object) -> None:
    if isinstance(typename, type) and issubclass(typename, torch.nn.Module):
        return
    if isinstance(typename, torch.nn.Module):
        hint = (
            f"pass the class ({type(typename).__name__}) and its arguments, or put the built "
            f"module itself in the layer list"
        )
    elif isinstance(typename, type):
        hint = "only torch.nn.Module subclasses can be built; subclass torch.nn.Module"
    else:
        hint = (
            "pass the module class and its arguments separately, e.g. "
            f"{spec_name}(torch.nn.Linear, 10, 20); a plain function can go in the layer list "
            "as it is"
        )
    raise TypeError(
        f"{spec_name} needs a torch.nn.Module subclass to build, got {typename!r} "
        f"(a {type(typename).__name__}); {hint}"
    )


def _rank_prefix() -> str:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return f"rank {torch.distributed.get_rank()}: "
    return ""


def _device_suffix(device: DeviceLike | None) -> str:
    return "" if device is None else f" on {torch.device(device)}"
