"""Named Cartesian process topologies: O(1) arithmetic between ranks and coordinates.

Nothing here touches `torch.distributed` (except the opt-in `to_device_mesh`), so a topology can
be built, inspected and compared on a laptop or in a planning job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pipetopo._checks import WrongTypeError, as_int
from pipetopo._coord import ProcessCoord as _Coord
from pipetopo._coord import check_axis_names, coord_class

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def _check_axes(axes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(axes, str) or not isinstance(axes, Iterable):
        raise WrongTypeError(
            f"axes must be a sequence of axis names such as ['pipe', 'data'], got {axes!r}."
        )
    names = tuple(axes)
    if not names:
        raise ValueError("axes is empty; a topology needs at least one axis, e.g. ['data'].")
    check_axis_names(names)
    return names


def _check_dims(dims: Sequence[int], axes: tuple[str, ...]) -> tuple[int, ...]:
    if not isinstance(dims, Iterable):
        raise WrongTypeError(f"dims must be a sequence of ints such as [2, 4], got {dims!r}.")
    sizes = tuple(as_int(d, f"dims entry {d!r}") for d in dims)
    if len(sizes) != len(axes):
        raise ValueError(
            f"axes and dims must have the same length, got {len(axes)} axes {list(axes)!r} and "
            f"{len(sizes)} dims {list(sizes)!r}; give one size per axis."
        )
    for axis, size in zip(axes, sizes, strict=True):
        if size <= 0:
            raise ValueError(
                f"dimension of axis {axis!r} must be a positive int, got {size} in "
                f"dims={list(sizes)!r}; use 1 for an axis that is not split."
            )
    return sizes


class ProcessTopology:
    """A named n-dimensional grid of ranks, laid out row-major with the last axis fastest.

    ``rank = sum(coord[i] * prod(dims[i + 1:]))``: with ``axes=['pipe', 'data']`` the ranks
    that differ only in ``data`` are neighbours. Conversions are O(1) arithmetic; the object is
    immutable, hashable, comparable and picklable, and needs no process group.

    >>> topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    >>> topo.get_rank(pipe=1, data=0, model=1)
    5
    >>> topo.get_coord(5)
    ProcessCoord(pipe=1, data=0, model=1)
    >>> topo.get_axis_comm_lists("pipe")
    [[0, 4], [1, 5], [2, 6], [3, 7]]

    Raises:
        WrongTypeError: ``axes`` is not a sequence of str or a dim is not an int (a
            ``TypeError`` that is also a ``ValueError``, see `pipetopo.WrongTypeError`).
        ValueError: an axis name is not a unique identifier, a dim is not positive, or the
            lengths differ.
    """

    __slots__ = ("_axes", "_coord_class", "_dims", "_strides", "_world_size")

    _axes: tuple[str, ...]
    _coord_class: type[_Coord]
    _dims: tuple[int, ...]
    _strides: tuple[int, ...]
    _world_size: int

    def __init__(self, axes: Sequence[str], dims: Sequence[int]) -> None:
        names = _check_axes(axes)
        sizes = _check_dims(dims, names)
        strides = tuple(math.prod(sizes[i + 1 :]) for i in range(len(sizes)))
        object.__setattr__(self, "_axes", names)
        object.__setattr__(self, "_coord_class", coord_class(names))
        object.__setattr__(self, "_dims", sizes)
        object.__setattr__(self, "_strides", strides)
        object.__setattr__(self, "_world_size", math.prod(sizes))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new topology instead.")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (ProcessTopology, (self._axes, self._dims))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProcessTopology):
            return NotImplemented
        return self._axes == other._axes and self._dims == other._dims

    def __hash__(self) -> int:
        return hash((self._axes, self._dims))

    def __repr__(self) -> str:
        return f"ProcessTopology(axes={list(self._axes)!r}, dims={list(self._dims)!r})"

    # ----------------------------------------------------------------------------- shape
    @property
    def axes(self) -> tuple[str, ...]:
        """The axis names, slowest first."""
        return self._axes

    @property
    def dims(self) -> tuple[int, ...]:
        """The size of each axis, in axis order."""
        return self._dims

    def get_axis_names(self) -> list[str]:
        """The axis names in layout order (slowest first)."""
        return list(self._axes)

    def get_dim(self, axis: str) -> int:
        """The number of ranks along ``axis``; 0 for an axis the topology does not have."""
        if axis not in self._axes:
            return 0
        return self._dims[self._axes.index(axis)]

    def world_size(self) -> int:
        """The number of ranks: the product of the dims."""
        return self._world_size

    # ------------------------------------------------------------------ rank <-> coordinate
    def get_rank(self, /, **coord: int) -> int:
        """The rank at a full coordinate, e.g. ``topo.get_rank(pipe=1, data=0)``.

        Raises:
            ValueError: an axis is missing (use `filter_match` for partial coordinates) or
                unknown, or a value is outside ``[0, dim)``.
        """
        self._check_known_axes(coord, "get_rank")
        missing = [axis for axis in self._axes if axis not in coord]
        if missing:
            raise ValueError(
                f"get_rank() needs a value for every axis {list(self._axes)}, but {missing} "
                f"are missing from {coord!r}; use filter_match(**{coord!r}) to list the ranks "
                "matching a partial coordinate."
            )
        rank = 0
        for axis, size, stride in zip(self._axes, self._dims, self._strides, strict=True):
            rank += self._check_value(axis, coord[axis], size) * stride
        return rank

    @property
    def ProcessCoord(self) -> type[_Coord]:  # noqa: N802 - DeepSpeed's attribute name
        """The coordinate class of this topology's axes (DeepSpeed's per-topology namedtuple).

        ``topo.ProcessCoord(1, 0, 1)`` or ``topo.ProcessCoord(pipe=1, data=0, model=1)``; it is
        the type `get_coord` returns, shared by every topology with the same axes.
        """
        return self._coord_class

    def get_coord(self, rank: int) -> _Coord:
        """The coordinate of ``rank``; its axes read as attributes (``coord.pipe``).

        Raises:
            ValueError: ``rank`` is outside ``[0, world_size())``.
        """
        remainder = checked_rank(self, rank)
        values = []
        for stride in self._strides:
            value, remainder = divmod(remainder, stride)
            values.append(value)
        return self._coord_class._make(values)

    def filter_match(self, /, **coord: int) -> list[int]:
        """The ranks, ascending, whose coordinates match every given axis value.

        >>> ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2]).filter_match(
        ...     pipe=0, data=1
        ... )
        [2, 3]
        """
        self._check_known_axes(coord, "filter_match")
        choices: list[Sequence[int]] = []
        for axis, size in zip(self._axes, self._dims, strict=True):
            if axis in coord:
                choices.append((self._check_value(axis, coord[axis], size),))
            else:
                choices.append(range(size))
        strides = self._strides
        return [
            sum(v * s for v, s in zip(values, strides, strict=True))
            for values in itertools.product(*choices)
        ]

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """The ranks, ascending, whose coordinate along ``axis`` is ``idx``."""
        return self.filter_match(**{axis: idx})

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """One rank list per combination of the other axes: the communicators along ``axis``.

        The lists come in row-major order of the other axes; each is ordered by its coordinate
        along ``axis``. An axis the topology does not have gives ``[]`` (as DeepSpeed), so code
        for optional axes needs no special case. Together the lists partition the ranks.
        """
        if axis not in self._axes:
            return []
        index = self._axes.index(axis)
        size = self._dims[index]
        stride = self._strides[index]
        outer = math.prod(self._dims[:index])
        block = size * stride
        return [
            list(range(base, base + block, stride))
            for base in (o * block + i for o in range(outer) for i in range(stride))
        ]

    def get_rank_repr(
        self,
        rank: int,
        omit_axes: Iterable[str] = ("data", "pipe"),
        inner_sep: str = "_",
        outer_sep: str = "-",
    ) -> str:
        """A file-name friendly label of ``rank``'s coordinate, e.g. ``'model_01'``.

        Every axis not in ``omit_axes`` appears as ``f"{axis}{inner_sep}{value:02d}"``, joined
        by ``outer_sep``; with the defaults only axes other than data and pipe are shown, which
        is how checkpoints name the files that differ between model-parallel ranks.
        """
        coord = self.get_coord(rank)
        omitted = frozenset(omit_axes)
        return outer_sep.join(
            f"{axis}{inner_sep}{value:02d}"
            for axis, value in zip(coord.axes, coord.values, strict=True)
            if axis not in omitted
        )

    # -------------------------------------------------------------------------- mesh
    def to_device_mesh(self, device_type: str) -> DeviceMesh:
        """A `torch.distributed.DeviceMesh` of this layout over the whole default group.

        The mesh has ``mesh_dim_names == axes`` and the same row-major layout, so
        ``mesh[coord]`` is ``get_rank(**coord)``. Built with ``init_device_mesh``, which creates
        process groups: this is a collective call, and every rank of the default group must
        call it with the same topology, or the job hangs. For a topology that lives on a
        sub-group, use `PipelineParallelGrid.to_device_mesh`.

        Raises:
            RuntimeError: torch.distributed is not initialised.
            ValueError: the default group's size differs from `world_size()`.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ProcessTopology.to_device_mesh() needs torch.distributed; call "
                "torch.distributed.init_process_group(...) first."
            )
        world = dist.get_world_size()
        if world != self._world_size:
            raise ValueError(
                f"{self!r} has {self._world_size} ranks but the default process group has "
                f"{world}; use a topology whose dims multiply to {world}."
            )
        return init_device_mesh(device_type, self._dims, mesh_dim_names=self._axes)

    # ------------------------------------------------------------------------ checks
    def _check_known_axes(self, coord: dict[str, int], method: str) -> None:
        unknown = sorted(set(coord) - set(self._axes))
        if unknown:
            raise ValueError(
                f"{method}() got unknown axes {unknown}; this topology has axes {list(self._axes)}."
            )

    def _check_value(self, axis: str, value: int, size: int) -> int:
        index = as_int(value, f"coordinate {axis}")
        if not 0 <= index < size:
            raise ValueError(
                f"coordinate {axis}={index} is out of range for {self!r}; "
                f"{axis} must be in [0, {size})."
            )
        return index


def checked_rank(topology: ProcessTopology, rank: object) -> int:
    """``rank`` as an int in ``[0, topology.world_size())``, or the error saying why not.

    Raises:
        WrongTypeError: ``rank`` is not an int.
        ValueError: ``rank`` is outside the topology.
    """
    index = as_int(rank, "rank")
    size = topology.world_size()
    if not 0 <= index < size:
        raise ValueError(
            f"rank {index} is out of range for {topology!r}; ranks are in [0, {size})."
        )
    return index


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline x data parallelism: axes ``('pipe', 'data')`` with dims ``(num_pp, num_dp)``.

    Data is the fastest axis, so the replicas of one stage get neighbouring ranks (usually one
    node), where the heavy gradient all-reduce runs; pipeline sends cross nodes.
    """

    __slots__ = ()

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__(axes=("pipe", "data"), dims=(num_pp, num_dp))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (PipeDataParallelTopology, self.dims)

    def __repr__(self) -> str:
        num_pp, num_dp = self.dims
        return f"PipeDataParallelTopology(num_pp={num_pp}, num_dp={num_dp})"


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline x data x model (tensor-slicing) parallelism.

    Note the order: the arguments are ``(num_pp, num_mp, num_dp)`` as in DeepSpeed, but the axes
    are ``('pipe', 'data', 'model')`` with dims ``(num_pp, num_dp, num_mp)``: model is the
    fastest axis, so the slices of one layer share a node.

    >>> PipeModelDataParallelTopology(num_pp=2, num_mp=4, num_dp=3).dims
    (2, 3, 4)
    """

    __slots__ = ()

    def __init__(self, num_pp: int, num_mp: int, num_dp: int) -> None:
        super().__init__(axes=("pipe", "data", "model"), dims=(num_pp, num_dp, num_mp))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        num_pp, num_dp, num_mp = self.dims
        return (PipeModelDataParallelTopology, (num_pp, num_mp, num_dp))

    def __repr__(self) -> str:
        num_pp, num_dp, num_mp = self.dims
        return f"PipeModelDataParallelTopology(num_pp={num_pp}, num_mp={num_mp}, num_dp={num_dp})"


def _prime_factors(number: int) -> list[int]:
    """The prime factors of ``number``, ascending, with repetition (1 has none)."""
    if number <= 0:
        raise ValueError(f"prime factors need a positive int, got {number}.")
    factors = []
    candidate = 2
    while candidate * candidate <= number:
        while number % candidate == 0:
            factors.append(candidate)
            number //= candidate
        candidate += 1
    if number > 1:
        factors.append(number)
    return factors


def default_topology(world_size: int) -> ProcessTopology:
    """The pipe x data topology a grid uses when given none (DeepSpeed's default split).

    The prime factors of ``world_size``, ascending, go alternately to pipe and data:
    ``8 = 2*2*2`` gives pipe 4 x data 2; ``12 = 2*2*3`` gives pipe 6 x data 2; a prime gives
    pipe ``world_size`` x data 1.

    Raises:
        WrongTypeError: ``world_size`` is not an int.
        ValueError: ``world_size`` is not positive.
    """
    size = as_int(world_size, "world_size")
    if size <= 0:
        raise ValueError(f"world_size must be a positive int, got {size}; pass the job's size.")
    num_pp = num_dp = 1
    for position, prime in enumerate(_prime_factors(size)):
        if position % 2 == 0:
            num_pp *= prime
        else:
            num_dp *= prime
    return PipeDataParallelTopology(num_pp=num_pp, num_dp=num_dp)


def grid_topology(topology: ProcessTopology | None, size: int) -> ProcessTopology:
    """The topology of a grid over a group of ``size`` ranks: ``topology``, or the default split.

    Raises:
        ValueError: the topology's size is not ``size``, or it lacks a ``pipe`` or ``data`` axis.
    """
    topo = default_topology(size) if topology is None else topology
    if topo.world_size() != size:
        raise ValueError(
            f"{topo!r} has {topo.world_size()} ranks but the process group has {size}; "
            f"use a topology whose dims multiply to {size}, or a process group of "
            f"{topo.world_size()} ranks."
        )
    missing = [axis for axis in ("pipe", "data") if axis not in topo.axes]
    if missing:
        raise ValueError(
            f"a grid needs 'pipe' and 'data' axes, but {topo!r} lacks {missing}; add them "
            "with size 1, e.g. PipeDataParallelTopology(num_pp, num_dp)."
        )
    return topo
