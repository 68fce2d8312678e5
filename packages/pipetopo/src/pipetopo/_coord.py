"""A named coordinate in a process topology: a tuple of ints with one name per axis."""

from __future__ import annotations

import keyword
import operator
import threading
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from pipetopo._checks import WrongTypeError


class ProcessCoord(tuple[int, ...]):
    """The position of one rank in a `ProcessTopology`: one integer per named axis.

    It is a tuple with namedtuple semantics, like the coordinates DeepSpeed returns: it equals
    and hashes like the plain tuple of its values (so ``topo.get_coord(5) == (1, 0, 1)``), axis
    values read as attributes (``coord.pipe``), and ``_fields``, ``_asdict()``, ``_replace()``
    and ``_make()`` work. Every axis tuple has its own subclass, `ProcessTopology.ProcessCoord`,
    whose constructor takes the values (``topo.ProcessCoord(1, 0)`` or
    ``topo.ProcessCoord(pipe=1, data=0)``). ``ProcessCoord(axes, values)`` on this base class
    builds an instance of that subclass.

    >>> coord = ProcessCoord(axes=("pipe", "data"), values=(1, 0))
    >>> coord.pipe, coord.data
    (1, 0)
    >>> coord
    ProcessCoord(pipe=1, data=0)
    >>> coord == (1, 0)
    True
    >>> coord.replace(data=1)
    ProcessCoord(pipe=1, data=1)
    """

    __slots__ = ()

    # The axis names; empty only on the base class, which has no instances of its own.
    _fields: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args: Any, **named: Any) -> ProcessCoord:
        if cls is ProcessCoord:
            axes, values = _axes_and_values(args, named)
            return coord_class(axes)._from_values(values)
        return cls._from_values(_values_of_call(cls._fields, args, named))

    @classmethod
    def _from_values(cls, values: Iterable[int]) -> ProcessCoord:
        """An instance of this per-axes class; ``ValueError`` on a length mismatch."""
        coord = tuple.__new__(cls, values)
        if len(coord) != len(cls._fields):
            raise ValueError(
                f"ProcessCoord needs one value per axis, got axes={cls._fields!r} and "
                f"values={tuple(coord)!r}; pass as many values as axes."
            )
        return coord

    @classmethod
    def _make(cls, iterable: Iterable[int]) -> ProcessCoord:
        """namedtuple's constructor from an iterable of values."""
        if cls is ProcessCoord:
            raise TypeError(
                "ProcessCoord._make() needs a per-axes class such as topology.ProcessCoord."
            )
        return cls._from_values(iterable)

    def __getattr__(self, name: str) -> int:
        # Reached only when normal lookup fails: axes are properties of the per-axes class, so
        # this is an unknown name. Declared with an int result so type checkers accept
        # `coord.pipe`.
        raise AttributeError(
            f"ProcessCoord has no axis {name!r}; its axes are {list(type(self)._fields)}."
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The per-axes classes are created at run time and cannot be found by name, so a
        # coordinate travels (pickle, spawn_ranks, all_gather_object) as its axes and values.
        return (ProcessCoord, (self._fields, tuple(self)))

    def __repr__(self) -> str:
        body = ", ".join(
            f"{axis}={value!r}" for axis, value in zip(self._fields, self, strict=True)
        )
        return f"ProcessCoord({body})"

    @property
    def axes(self) -> tuple[str, ...]:
        """The axis names, in topology order (namedtuple's ``_fields``)."""
        return self._fields

    @property
    def values(self) -> tuple[int, ...]:
        """The coordinate as a plain tuple."""
        return tuple(self)

    def as_dict(self) -> dict[str, int]:
        """The coordinate as ``{axis: value}``, in axis order."""
        return dict(zip(self._fields, self, strict=True))

    def replace(self, **values: int) -> ProcessCoord:
        """A copy with some axis values replaced; an unknown axis raises `ValueError`."""
        unknown = sorted(set(values) - set(self._fields))
        if unknown:
            raise ValueError(
                f"ProcessCoord.replace() got unknown axes {unknown}; "
                f"the axes are {list(self._fields)}."
            )
        return type(self)._from_values(
            values.get(axis, value) for axis, value in zip(self._fields, self, strict=True)
        )

    # namedtuple spellings, so code written against DeepSpeed's coordinates keeps working.
    def _asdict(self) -> dict[str, int]:
        return self.as_dict()

    def _replace(self, **values: int) -> ProcessCoord:
        return self.replace(**values)


def _axes_and_values(
    args: tuple[Any, ...], named: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The ``(axes, values)`` of a call to the base class, positional or by keyword."""
    params = ("axes", "values")
    unexpected = sorted(set(named) - set(params))
    if len(args) > len(params) or unexpected:
        raise TypeError(
            "ProcessCoord(axes, values) takes the axis names and their values, got "
            f"{len(args)} positional arguments and keywords {sorted(named)}; for "
            "ProcessCoord(pipe=..., data=...) use a topology's class, topology.ProcessCoord."
        )
    bound = dict(zip(params, args, strict=False))
    for param in params:
        if param in named:
            if param in bound:
                raise TypeError(f"ProcessCoord() got multiple values for argument {param!r}.")
            bound[param] = named[param]
    missing = [param for param in params if param not in bound]
    if missing:
        raise TypeError(f"ProcessCoord(axes, values) is missing {missing}.")
    axes, values = bound["axes"], bound["values"]
    if isinstance(axes, str) or not isinstance(axes, Iterable):
        raise TypeError(f"ProcessCoord axes must be a sequence of axis names, got {axes!r}.")
    if not isinstance(values, Iterable):
        raise TypeError(f"ProcessCoord values must be a sequence of ints, got {values!r}.")
    return tuple(axes), tuple(values)


def _values_of_call(
    fields: tuple[str, ...], args: tuple[Any, ...], named: dict[str, Any]
) -> list[int]:
    """The values of a call to a per-axes class, bound like a namedtuple's ``__new__``."""
    if len(args) > len(fields):
        raise TypeError(
            f"ProcessCoord takes {len(fields)} values for axes {list(fields)}, got {len(args)}."
        )
    unknown = sorted(set(named) - set(fields))
    if unknown:
        raise TypeError(f"ProcessCoord got unknown axes {unknown}; the axes are {list(fields)}.")
    twice = [axis for axis in fields[: len(args)] if axis in named]
    if twice:
        raise TypeError(f"ProcessCoord got axes {twice} both by position and by name.")
    values = list(args) + [named[axis] for axis in fields[len(args) :] if axis in named]
    if len(values) != len(fields):
        missing = [axis for axis in fields[len(args) :] if axis not in named]
        raise TypeError(f"ProcessCoord is missing values for axes {missing}.")
    return values


def reserved_axis_names() -> frozenset[str]:
    """Names an axis cannot have: they would shadow a method or property of a coordinate.

    Includes the tuple methods ``count`` and ``index``, which a coordinate inherits.
    """
    return frozenset(name for name in dir(ProcessCoord) if not name.startswith("_"))


_RESERVED = reserved_axis_names()
_CLASSES: dict[tuple[str, ...], type[ProcessCoord]] = {}
_CLASSES_LOCK = threading.Lock()


def check_axis_names(names: tuple[str, ...]) -> None:
    """Raise unless every name can be a coordinate attribute: a unique, unreserved identifier.

    Raises:
        WrongTypeError: a name is not a str.
        ValueError: a name is not an identifier, starts with ``_``, is reserved (see
            `reserved_axis_names`), or repeats.
    """
    for name in names:
        if not isinstance(name, str):
            raise WrongTypeError(f"axis names must be str, got {name!r} in axes={list(names)!r}.")
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ValueError(
                f"axis name {name!r} in axes={list(names)!r} is not usable as an attribute; "
                "use a Python identifier that does not start with '_', e.g. 'pipe'."
            )
        if name in _RESERVED:
            raise ValueError(
                f"axis name {name!r} in axes={list(names)!r} is reserved by ProcessCoord "
                f"(reserved: {sorted(_RESERVED)}); choose another name."
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"axis names must be unique, but {duplicates} repeat in axes={list(names)!r}; "
            "give every axis its own name."
        )


def coord_class(axes: Sequence[str]) -> type[ProcessCoord]:
    """The `ProcessCoord` subclass for ``axes``: one per axis tuple, created on first use.

    Raises:
        ValueError: an axis name is not a unique identifier, starts with ``_``, or is reserved
            (see `reserved_axis_names`).
    """
    key = tuple(axes)
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls
    check_axis_names(key)
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": __name__,
        "__qualname__": "ProcessCoord",
        "_fields": key,
    }
    for index, name in enumerate(key):
        namespace[name] = property(operator.itemgetter(index), doc=f"The {name} coordinate.")
    with _CLASSES_LOCK:
        # Another thread may have won the race; everyone must share one class per axes.
        return _CLASSES.setdefault(key, type("ProcessCoord", (ProcessCoord,), namespace))
