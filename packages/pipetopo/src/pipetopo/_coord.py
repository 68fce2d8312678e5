"""A named coordinate in a process topology."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, repr=False)
class ProcessCoord:
    """The position of one rank in a `ProcessTopology`: one integer per named axis.

    Axis values read as attributes (``coord.pipe``), like the namedtuple DeepSpeed returns;
    the coordinate also iterates, indexes and unpacks like a tuple of its values.

    >>> coord = ProcessCoord(axes=("pipe", "data"), values=(1, 0))
    >>> coord.pipe, coord.data
    (1, 0)
    >>> coord
    ProcessCoord(pipe=1, data=0)
    >>> coord.replace(data=1)
    ProcessCoord(pipe=1, data=1)
    """

    axes: tuple[str, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.values):
            raise ValueError(
                f"ProcessCoord needs one value per axis, got axes={self.axes!r} and "
                f"values={self.values!r}; pass as many values as axes."
            )

    def __getattr__(self, name: str) -> int:
        # Only called when normal lookup fails. Private names go straight to AttributeError so
        # that copy/pickle probing a half-built instance cannot recurse into the slots.
        if not name.startswith("_"):
            axes: tuple[str, ...] = object.__getattribute__(self, "axes")
            if name in axes:
                values: tuple[int, ...] = object.__getattribute__(self, "values")
                return values[axes.index(name)]
        raise AttributeError(f"ProcessCoord has no axis {name!r}")

    def __iter__(self) -> Iterator[int]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> int:
        return self.values[index]

    def __repr__(self) -> str:
        body = ", ".join(
            f"{axis}={value}" for axis, value in zip(self.axes, self.values, strict=True)
        )
        return f"ProcessCoord({body})"

    def as_dict(self) -> dict[str, int]:
        """The coordinate as ``{axis: value}``, in axis order."""
        return dict(zip(self.axes, self.values, strict=True))

    def replace(self, **values: int) -> ProcessCoord:
        """A copy with some axis values replaced; an unknown axis raises `ValueError`."""
        unknown = sorted(set(values) - set(self.axes))
        if unknown:
            raise ValueError(
                f"ProcessCoord.replace() got unknown axes {unknown}; "
                f"the axes are {list(self.axes)}."
            )
        return ProcessCoord(
            self.axes, tuple(values.get(a, v) for a, v in zip(self.axes, self.values, strict=True))
        )

    # namedtuple spellings, so code written against DeepSpeed's coordinates keeps working.
    def _asdict(self) -> dict[str, int]:
        return self.as_dict()

    def _replace(self, **values: int) -> ProcessCoord:
        return self.replace(**values)
