"""The communication grid of a topology: `GridCore` asks by axis, as torch's ``DeviceMesh``
does, and `PipelineParallelGrid` adds DeepSpeed's and Megatron's names (`_deepspeed_names`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
from torch.distributed import ProcessGroup

from pipetopo._checks import WrongTypeError, as_int
from pipetopo._coord import ProcessCoord
from pipetopo._deepspeed_names import DeepSpeedGridNames
from pipetopo._groups import GroupCache, default_if_none, grid_process_group
from pipetopo._topology import ProcessTopology, checked_rank, grid_topology

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

_Grid = TypeVar("_Grid", bound="GridCore")


class GridCore:
    """The axis-parametrised core of `PipelineParallelGrid`, which documents it; build that."""

    def __init__(
        self,
        topology: ProcessTopology | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        if topology is not None and not isinstance(topology, ProcessTopology):
            raise WrongTypeError(
                f"topology must be a ProcessTopology or None, got {type(topology).__name__}; "
                "build one with ProcessTopology(axes, dims)."
            )
        group, rank, size, global_ranks = grid_process_group(process_group)
        topo = grid_topology(topology, size)
        self._topology = topo
        self._global_ranks = global_ranks
        self._rank = rank
        self._coord = topo.get_coord(rank)
        # The cache is the only holder of the grid's group, in its kept form.
        self._cache = GroupCache(group, global_ranks, rank, size)
        if rank == 0:
            logger.info("building a pipeline grid for %r", topo)

        # [Note: one creation order] in _groups: the families, in a fixed order, on every rank.
        self._lines: dict[str, tuple[int, ...]] = {}
        for axis in topo.axes:
            self._cache.create([tuple(ranks) for ranks in topo.get_axis_comm_lists(axis)])
            others = {a: v for a, v in self._coord.as_dict().items() if a != axis}
            self._lines[axis] = tuple(topo.filter_match(**others))
        self._cache.create([tuple(topo.filter_match(data=d)) for d in range(topo.get_dim("data"))])
        self._replica = tuple(topo.filter_match(data=self._coord.data))
        if "model" not in topo.axes:
            # DeepSpeed's slice group of a topology without tensor slicing is each rank alone;
            # created here because group creation must follow one order on every rank.
            self._cache.create([(r,) for r in range(size)])

    # ------------------------------------------------------------------------ identity
    @property
    def process_group(self) -> ProcessGroup:
        """The group the grid lives in (the default group unless one was given)."""
        return default_if_none(self._cache.process_group)

    def topology(self) -> ProcessTopology:
        """The grid's topology; its ranks are ranks within `process_group` (a method: DeepSpeed)."""
        return self._topology

    @property
    def axes(self) -> tuple[str, ...]:
        """The topology's axis names, slowest first."""
        return self._topology.axes

    @property
    def coord(self) -> ProcessCoord:
        """This rank's coordinate in the topology."""
        return self._coord

    @property
    def topology_rank(self) -> int:
        """This process's rank in the topology (its rank within `process_group`)."""
        return self._rank

    def to_global_rank(self, topology_rank: int) -> int:
        """The global rank of a topology rank."""
        return self._cache.to_global(checked_rank(self._topology, topology_rank))

    def to_topology_rank(self, global_rank: int) -> int:
        """The topology rank of a global rank; `ValueError` if it is not in the grid."""
        rank = as_int(global_rank, "global_rank")
        if self._global_ranks is None:
            return checked_rank(self._topology, rank)
        if rank not in self._global_ranks:
            raise ValueError(
                f"global rank {rank} is not in this grid's process group (global ranks "
                f"{list(self._global_ranks)}); pass one of those."
            )
        return self._global_ranks.index(rank)

    def _to_global(self, ranks: Sequence[int]) -> tuple[int, ...]:
        return tuple(self._cache.to_global(r) for r in ranks)

    # ---------------------------------------------------------------------------- axes
    def axis_size(self, axis: str) -> int:
        """The number of ranks along ``axis``."""
        return self._topology.get_dim(self._known(axis))

    def axis_rank(self, axis: str) -> int:
        """This rank's coordinate along ``axis`` (its rank in `axis_group`)."""
        return self._coord.as_dict()[self._known(axis)]

    def axis_ranks(self, axis: str) -> tuple[int, ...]:
        """The global ranks that differ from this rank only along ``axis``, by coordinate."""
        return self._to_global(self._lines[self._known(axis)])

    def axis_group(self, axis: str) -> ProcessGroup | None:
        """The group of `axis_ranks`; None when that is the default group (see the class)."""
        return self._cache.kept(self._lines[self._known(axis)])

    def replica_ranks(self) -> tuple[int, ...]:
        """The global ranks sharing this rank's ``data`` coordinate (pipe x model), ascending.

        One model replica: DeepSpeed's "model-parallel" group."""
        return self._to_global(self._replica)

    def replica_group(self) -> ProcessGroup | None:
        """The group of `replica_ranks`; None when that is the default group (see the class)."""
        return self._cache.kept(self._replica)

    def _known(self, axis: str) -> str:
        if axis not in self._lines:
            raise ValueError(
                f"the grid has no axis {axis!r}; its axes are {list(self._topology.axes)}; "
                "pass one of those names."
            )
        return axis

    # -------------------------------------------------------------------------- stages
    @property
    def stage_id(self) -> int:
        """This rank's pipeline stage (its ``pipe`` coordinate)."""
        return self._coord.pipe

    @property
    def num_stages(self) -> int:
        """The number of pipeline stages (the size of the ``pipe`` axis)."""
        return self._topology.get_dim("pipe")

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank runs the first pipeline stage."""
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank runs the last pipeline stage."""
        return self.stage_id == self.num_stages - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """The global rank of the previous stage at this rank's other coordinates; None first."""
        return None if self.is_first_stage else self.stage_to_global(self.stage_id - 1)

    @property
    def next_stage_rank(self) -> int | None:
        """The global rank of the next stage at this rank's other coordinates; None last."""
        return None if self.is_last_stage else self.stage_to_global(self.stage_id + 1)

    def stage_to_global(self, stage_id: int, **coord: int) -> int:
        """The global rank running ``stage_id`` at this rank's other coordinates.

        Keyword arguments override other axes: ``grid.stage_to_global(1, data=0)`` is the
        rank of stage 1 in replica 0. The result is usable with ``torch.distributed.send``.
        """
        if "pipe" in coord or not set(coord) <= set(self._topology.axes):
            raise ValueError(
                f"stage_to_global() got the coordinates {coord}; pass the stage as stage_id and "
                f"only other axes by name, of {list(self._topology.axes)}."
            )
        target = self._coord.replace(pipe=stage_id, **coord)
        return self._cache.to_global(self._topology.get_rank(**target.as_dict()))

    # -------------------------------------------------------------------------- groups
    def group_for(self, ranks: Sequence[int]) -> ProcessGroup | None:
        """The process group of a set of topology ranks (e.g. a tie), created once and cached.

        Ranks are deduplicated and sorted: ``[3, 0]`` and ``[0, 3, 3]`` name one group. Returns
        None on non-members and the real ``ProcessGroup`` (even the default group) on members;
        an object that keeps the group should keep `group_of`'s answer instead.

        .. warning::
            A collective call over `process_group`: every rank of the grid must call it with the
            same ranks, in the same order relative to other group-creating calls, members or
            not, or the job hangs. (A cached set makes no call on any rank.)

        Raises:
            ValueError: ``ranks`` is empty or names a rank outside the topology (checked before
                any communication).
        """
        key = self._rank_set(ranks, "group_for")
        self._cache.create([key])
        return default_if_none(self._cache.kept(key)) if self._rank in key else None

    def group_of(self, ranks: Sequence[int]) -> ProcessGroup | None:
        """The group of topology ``ranks`` that already exists, looked up without communicating.

        The set was created by `group_for`, or is an axis line or a replica; ranks are sorted
        and deduplicated as there. None means the default group (see the class).

        Raises:
            ValueError: this rank is not in ``ranks``, or no group of that set was created.
        """
        key = self._rank_set(ranks, "group_of")
        if self._rank not in key:
            raise ValueError(
                f"group_of() got topology ranks {list(key)}, which do not include this rank "
                f"({self._rank}); only members hold a group, so ask on one of those ranks."
            )
        try:
            return self._cache.kept(key)
        except LookupError:
            raise ValueError(
                f"the grid has no group of topology ranks {list(key)}; create it first with "
                "group_for(ranks), a collective call on every rank of the grid."
            ) from None

    def _rank_set(self, ranks: Sequence[int], method: str) -> tuple[int, ...]:
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
            raise WrongTypeError(
                f"{method}() needs a sequence of topology ranks, got {ranks!r}; pass e.g. [0, 3]."
            )
        key = tuple(sorted({checked_rank(self._topology, r) for r in ranks}))
        if not key:
            raise ValueError(f"{method}() got no ranks; pass at least one topology rank.")
        return key

    @property
    def group_creation_calls(self) -> int:
        """How many collective group-creating calls this grid has made on this rank."""
        return self._cache.collective_calls

    @property
    def local_group_creation_calls(self) -> int:
        """How many single-rank groups this rank created on its own (no other rank took part)."""
        return self._cache.local_calls

    def close(self) -> None:
        """Give back this grid's process groups; groups no other live grid uses are destroyed.

        Groups are shared between grids over the same ranks, so constructing one grid after
        another does not add groups; ``close()`` frees them (their connections, file
        descriptors and threads) once no grid needs them. Like construction it is collective
        in order: every rank of the grid must close it, in the same order relative to
        creating other grids or groups. Afterwards every group accessor raises
        ``RuntimeError``; closing twice does nothing. The grid is also a context manager that
        closes on exit.
        """
        self._cache.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._cache.closed

    def __enter__(self: _Grid) -> _Grid:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def to_device_mesh(self, device_type: str) -> DeviceMesh:
        """The grid as a `torch.distributed.DeviceMesh` with ``mesh_dim_names`` = the axes.

        Reuses the grid's axis groups, so it creates no group and does not communicate. The
        mesh holds global ranks in the topology's layout.
        """
        from torch.distributed.device_mesh import DeviceMesh

        topo = self._topology
        mesh = torch.tensor(self._to_global(range(topo.world_size())), dtype=torch.int)
        groups = [default_if_none(self.axis_group(axis)) for axis in topo.axes]
        return DeviceMesh.from_group(
            groups, device_type, mesh=mesh.reshape(topo.dims), mesh_dim_names=topo.axes
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(topology={self._topology!r}, topology_rank={self._rank}, "
            f"coord={self._coord!r})"
        )


class PipelineParallelGrid(DeepSpeedGridNames, GridCore):
    """The process groups of a `ProcessTopology`: a core asked by axis, and DeepSpeed's names.

    Construction creates, through ``torch.distributed``, one group per line of every axis (the
    ranks that differ only along that axis) and one per model replica (the ranks sharing a data
    coordinate). Accessors, `group_of` and `to_device_mesh` never communicate; `group_for` does.

    The core (`axis_size`, `axis_rank`, `axis_ranks`, `axis_group`, `replica_ranks`, ...) is
    what pipestack's own code uses; an unknown axis raises `ValueError` naming the axes.
    DeepSpeed's and Megatron's spellings (``get_data_parallel_group()``, ``pp_group``, ...) are
    a layer over it with DeepSpeed's meanings and types (`pipetopo._deepspeed_names`).

    Groups to keep: `axis_group`, `replica_group` and `group_of` return None for the default
    group, torch's own convention (``torch.distributed`` reads ``group=None`` as the default
    group), so an object that stores their answer never keeps the default ``ProcessGroup``
    alive past ``destroy_process_group()``, which with gloo can abort the process at exit
    ([Note: the default group is never kept] in ``pipetopo._groups``). The DeepSpeed and
    Megatron accessors, `group_for` and `process_group` return real ``ProcessGroup`` objects,
    as DeepSpeed does: use those for a call, not to store.

    .. warning::
        Constructing a grid is a collective call. Every rank of ``process_group`` must construct
        it with the same topology, and create its groups in the same order relative to other
        group-creating calls (``new_group``, `group_for`, ``init_device_mesh``), or the job
        hangs. Arguments are checked before the first collective, so a bad call raises
        everywhere instead of hanging.

    Ranks: a topology rank is a rank *within* ``process_group``; every rank the grid returns
    (`stage_to_global`, `axis_ranks`, `replica_ranks`, `pp_group`, ...) is a *global* rank,
    usable with ``torch.distributed.send``/``recv``. The two coincide when the grid spans the
    default group; `to_global_rank` and `to_topology_rank` convert.

    Args:
        topology: the layout; by default DeepSpeed's pipe x data split of the group's size
            (`default_topology`). It must have ``pipe`` and ``data`` axes.
        process_group: the group the grid lives in; default: the whole job (the default
            group). Only its ranks construct the grid. torch numbers groups by creation order,
            so when it is a sub-group, ranks outside it must create as many groups (for example
            an equal grid on their own sub-group) before all ranks create a group together again.

    Raises:
        RuntimeError: torch.distributed is not initialised, or this rank is not in
            ``process_group``.
        ValueError: the topology's size differs from the group's, or it lacks an axis.
        WrongTypeError: an argument has the wrong type (a ``TypeError``).
    """
