"""Dotted attribute paths naming a tied tensor inside a module: ``"weight"``, ``"proj.weight"``."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def resolve_tied_attr(module: torch.nn.Module, path: str) -> torch.Tensor:
    """Return the tensor (usually a ``torch.nn.Parameter``) at ``path`` inside ``module``.

    ``path`` is a dotted attribute path relative to ``module``: ``"weight"`` or
    ``"decoder.proj.weight"``. Each step is an ordinary attribute lookup, so parameters, buffers
    and plain tensor attributes are all found.

    Raises:
        TypeError: ``path`` is not a str, or it names something that is not a tensor.
        ValueError: ``path`` is empty or has an empty step (``"proj..weight"``).
        AttributeError: a step of ``path`` does not exist; the message names the step, the
            path and the module's class.
    """
    check_attr_path(path)
    target: object = module
    walked: list[str] = []
    for step in path.split("."):
        try:
            target = getattr(target, step)
        except AttributeError:
            where = ".".join([type(module).__name__, *walked])
            raise AttributeError(
                f"tied attribute {path!r} not found in {type(module).__name__}: {where} has no "
                f"attribute {step!r}; check tied_weight_attr against the module's "
                f"named_parameters()"
            ) from None
        walked.append(step)
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"tied attribute {path!r} of {type(module).__name__} is a {type(target).__name__}, "
            f"not a tensor; point tied_weight_attr at a parameter or buffer"
        )
    return target


def check_attr_path(path: object) -> str:
    """Validate one dotted attribute path and return it."""
    if not isinstance(path, str):
        raise TypeError(
            f"a tied attribute path must be a str such as 'weight' or 'proj.weight', "
            f"got {path!r} (a {type(path).__name__})"
        )
    if not path or any(not step for step in path.split(".")):
        raise ValueError(
            f"tied attribute path {path!r} is empty or has an empty step; write a dotted path "
            f"such as 'weight' or 'proj.weight'"
        )
    return path


def normalise_attr_paths(paths: object) -> tuple[str, ...]:
    """Turn ``"weight"`` or a sequence of paths into a tuple of validated, distinct paths."""
    if isinstance(paths, str):
        return (check_attr_path(paths),)
    if not isinstance(paths, Sequence):
        raise TypeError(
            f"tied_weight_attr must be a str or a sequence (list or tuple) of str, got {paths!r} "
            f"(a {type(paths).__name__})"
        )
    normalised = tuple(check_attr_path(path) for path in paths)
    if not normalised:
        raise ValueError(
            "tied_weight_attr is empty, so nothing would be tied; name at least one attribute, "
            "e.g. tied_weight_attr='weight'"
        )
    duplicates = sorted({path for path in normalised if normalised.count(path) > 1})
    if duplicates:
        raise ValueError(
            f"tied_weight_attr {paths!r} names {duplicates} more than once; list each path once"
        )
    return normalised
