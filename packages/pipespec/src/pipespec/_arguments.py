"""How a spec's stored constructor arguments are shown, compared and hashed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def format_call(callee: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """Return ``callee(arg, ..., key=value, ...)`` with every value shown by its repr."""
    parts = [repr(value) for value in args]
    parts.extend(f"{name}={value!r}" for name, value in kwargs.items())
    return f"{callee}({', '.join(parts)})"


def values_equal(left: object, right: object) -> bool:
    """Compare two stored arguments without ever raising.

    Tensors are compared by content, because ``bool(a == b)`` on a tensor with more than one
    element raises, and two specs holding equal tensors should compare equal. Anything whose
    ``==`` raises or does not reduce to one bool (numpy arrays) is only equal to itself.
    """
    if left is right:
        return True
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        return (
            isinstance(left, torch.Tensor)
            and isinstance(right, torch.Tensor)
            and _tensors_equal(left, right)
        )
    try:
        return bool(left == right)
    except Exception:
        return False


def arguments_equal(
    left_args: tuple[Any, ...],
    left_kwargs: Mapping[str, Any],
    right_args: tuple[Any, ...],
    right_kwargs: Mapping[str, Any],
) -> bool:
    """Positional arguments in order, keyword arguments regardless of order."""
    if len(left_args) != len(right_args) or left_kwargs.keys() != right_kwargs.keys():
        return False
    return all(map(values_equal, left_args, right_args)) and all(
        values_equal(value, right_kwargs[name]) for name, value in left_kwargs.items()
    )


def value_hash(value: object) -> int:
    """Hash consistent with :func:`values_equal`; a tensor hashes by dtype, shape and device."""
    if isinstance(value, torch.Tensor):
        return hash(("tensor", value.dtype, tuple(value.shape), str(value.device)))
    return hash(value)


def arguments_hash(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """Raises TypeError (from the offending value) when an argument is unhashable."""
    positional = tuple(value_hash(value) for value in args)
    # A frozenset, because keyword order does not take part in equality.
    keywords = frozenset((name, value_hash(value)) for name, value in kwargs.items())
    return hash((positional, keywords))


def _tensors_equal(left: torch.Tensor, right: torch.Tensor) -> bool:
    if left.dtype != right.dtype or left.shape != right.shape or left.device != right.device:
        return False
    if left.is_meta:
        # Meta tensors have no values; same dtype, shape and device is all there is to compare.
        return True
    return bool(torch.equal(left, right))
