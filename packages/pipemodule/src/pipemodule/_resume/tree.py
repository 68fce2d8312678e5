"""Nested plain values as one JSON text plus named tensors, so a checkpoint never holds a pickle.

``torch.distributed.checkpoint`` stores a non-tensor value with ``torch.save``, which is a pickle;
a pickle of a user object would run code when loaded. Every non-tensor value pipestack saves
(optimizer hyperparameters, scheduler state, RNG states, the user's extra state) is therefore
turned into a JSON string first: dicts, lists, tuples, numbers, strings, booleans and ``None``
are written in the JSON, and every tensor is replaced by the checkpoint key it is stored under.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TreeEncoding", "decode_tree", "encode_tree", "tensor_keys_of"]

_TENSOR, _DICT, _LIST, _TUPLE, _FLOAT = (
    "__tensor__",
    "__dict__",
    "__list__",
    "__tuple__",
    "__float__",
)


class TreeEncoding:
    """A value as a JSON text (``text``) and the tensors it refers to (``tensors``, by key)."""

    def __init__(self, text: str, tensors: dict[str, torch.Tensor]) -> None:
        self.text = text
        self.tensors = tensors


def encode_tree(key: str, value: Any, *, what: str) -> TreeEncoding:
    """Encode ``value``; its tensors are stored under ``key:<path>`` keys (``key:`` for a tensor).

    Raises TypeError naming ``what`` and the path of the first value that is not a tensor,
    number, string, bool, None, or a dict (str or int keys), list or tuple of those.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(item: Any, path: str) -> Any:
        if isinstance(item, torch.Tensor):
            name = f"{key}:{path}"
            tensors[name] = item.detach()
            return {_TENSOR: name}
        if item is None or isinstance(item, (bool, int, str)):
            return item
        if isinstance(item, float):
            # JSON has no inf or nan: spell them so that any JSON reader can read the text.
            return item if math.isfinite(item) else {_FLOAT: repr(item)}
        if isinstance(item, Mapping):
            pairs = []
            for name, entry in item.items():
                if isinstance(name, bool) or not isinstance(name, (str, int)):
                    raise TypeError(
                        f"{what}{_at(path)} has the key {name!r} of type "
                        f"{type(name).__name__}; checkpoints keep dict keys that are str or int"
                    )
                pairs.append([name, encode(entry, _join(path, str(name)))])
            return {_DICT: pairs}
        if isinstance(item, (list, tuple)):
            entries = [encode(entry, _join(path, str(i))) for i, entry in enumerate(item)]
            return {_LIST if isinstance(item, list) else _TUPLE: entries}
        raise TypeError(
            f"{what}{_at(path)} is a {type(item).__module__}.{type(item).__qualname__}; "
            f"checkpoints keep tensors, numbers, strings, bools, None and dicts, lists and "
            f"tuples of those (never pickled objects): pass its state_dict() or plain values"
        )

    text = json.dumps(encode(value, ""), allow_nan=False)
    return TreeEncoding(text, tensors)


def tensor_keys_of(text: str) -> list[str]:
    """The checkpoint keys of the tensors an encoded value refers to."""
    keys: list[str] = []

    def visit(item: Any) -> None:
        if isinstance(item, dict):
            if _TENSOR in item:
                keys.append(str(item[_TENSOR]))
            for entry in item.values():
                visit(entry)
        elif isinstance(item, list):
            for entry in item:
                visit(entry)

    visit(json.loads(text))
    return keys


def decode_tree(text: str, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The value :func:`encode_tree` encoded, its tensors taken from ``tensors``."""

    def decode(item: Any) -> Any:
        if isinstance(item, dict):
            if _TENSOR in item:
                return tensors[item[_TENSOR]]
            if _FLOAT in item:
                return float(item[_FLOAT])
            if _DICT in item:
                return {name: decode(entry) for name, entry in item[_DICT]}
            if _LIST in item:
                return [decode(entry) for entry in item[_LIST]]
            if _TUPLE in item:
                return tuple(decode(entry) for entry in item[_TUPLE])
            raise ValueError(f"unknown encoded value {item!r}")
        return item

    return decode(json.loads(text))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _at(path: str) -> str:
    return f" at {path!r}" if path else ""
