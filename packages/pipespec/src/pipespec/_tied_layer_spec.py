"""TiedLayerSpec: a layer whose weights are shared with every other layer of the same tie key."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import torch

from pipespec._arguments import values_equal
from pipespec._layer_spec import LayerSpec
from pipespec._tied_attr import normalise_attr_paths

ForwardFn: TypeAlias = Callable[[torch.nn.Module, Any], Any]
"""``forward_fn(module, x)``: how a tied layer is applied when not by ``module(x)``."""

_DEFAULT_TIED_ATTR = ("weight",)


class TiedLayerSpec(LayerSpec):
    """A :class:`LayerSpec` whose module is shared by every layer with the same ``key``.

    The classic use is an embedding at the first stage that doubles as the output projection at
    the last one::

        >>> embed = TiedLayerSpec("embed", torch.nn.Embedding, 100, 16)
        >>> head = TiedLayerSpec("embed", torch.nn.Embedding, 100, 16, forward_fn=lm_head)

    Each stage holding a layer with key ``"embed"`` builds the module once, and the tensors named
    by ``tied_weight_attr`` are kept identical across those stages.

    Args:
        key: the tie key; a non-empty str without ``'.'`` (it names a submodule).
        typename, module_args, module_kwargs: as for :class:`LayerSpec`.
        forward_fn: optional ``forward_fn(module, x)`` used instead of ``module(x)``.
        tied_weight_attr: the attribute path, or a sequence of paths, of the shared tensors,
            relative to the module (``"weight"``, ``"proj.weight"``). Stored as a tuple.
    """

    __slots__ = ("forward_fn", "key", "tied_weight_attr")

    key: str
    forward_fn: ForwardFn | None
    tied_weight_attr: tuple[str, ...]

    def __init__(
        self,
        key: str,
        typename: type[torch.nn.Module],
        *module_args: Any,
        forward_fn: ForwardFn | None = None,
        tied_weight_attr: str | Sequence[str] = _DEFAULT_TIED_ATTR,
        **module_kwargs: Any,
    ):
        _check_key(key)
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(
                f"forward_fn must be a callable taking (module, input) or None, got {forward_fn!r} "
                f"(a {type(forward_fn).__name__})"
            )
        super().__init__(typename, *module_args, **module_kwargs)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "forward_fn", forward_fn)
        object.__setattr__(self, "tied_weight_attr", normalise_attr_paths(tied_weight_attr))

    def __repr__(self) -> str:
        extras = ""
        if self.tied_weight_attr != _DEFAULT_TIED_ATTR:
            extras += f", tied_weight_attr={self.tied_weight_attr!r}"
        if self.forward_fn is not None:
            # A qualified name rather than the function's repr, which carries a memory address
            # and so would differ between processes.
            name = getattr(self.forward_fn, "__qualname__", None)
            extras += f", forward_fn={name if isinstance(name, str) else repr(self.forward_fn)}"
        return f"{type(self).__name__}({self.key!r}, {super().__repr__()}{extras})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TiedLayerSpec) or type(other) is not type(self):
            return NotImplemented
        return (
            super().__eq__(other)
            and self.key == other.key
            and self.tied_weight_attr == other.tied_weight_attr
            and values_equal(self.forward_fn, other.forward_fn)
        )

    def __hash__(self) -> int:
        return hash((super().__hash__(), self.key, self.tied_weight_attr, self.forward_fn))

    def __getstate__(self) -> dict[str, Any]:
        return {
            **super().__getstate__(),
            "key": self.key,
            "forward_fn": self.forward_fn,
            "tied_weight_attr": self.tied_weight_attr,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name in ("key", "forward_fn", "tied_weight_attr"):
            object.__setattr__(self, name, state[name])


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(
            f"TiedLayerSpec key must be a str naming the tie group, e.g. 'embed', got {key!r} "
            f"(a {type(key).__name__})"
        )
    if not key or "." in key:
        raise ValueError(
            f"TiedLayerSpec key {key!r} must be non-empty and contain no '.', because it names "
            f"the shared submodule; use e.g. 'embed' or 'embed_tokens'"
        )
