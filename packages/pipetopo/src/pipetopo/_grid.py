"""The communication grid of a topology: its torch.distributed groups and DeepSpeed's MPU API."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipetopo._coord import ProcessCoord
from pipetopo._groups import (
    GroupCache,
    default_group_bound_to_device,
    default_if_none,
    none_if_default,
    uses_split_group,
)
from pipetopo._topology import ProcessTopology, _as_int, default_topology

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

_REQUIRED_AXES = ("pipe", "data")


class PipelineParallelGrid:
    """The process groups of a `ProcessTopology`, with DeepSpeed's grid/MPU accessors.

    Construction creates, through ``torch.distributed``, one group per line of every axis (the
    ranks that differ only along that axis) and DeepSpeed's "model parallel" groups (all ranks
    sharing a data coordinate). Accessors and `to_device_mesh` never communicate; `group_for`
    does.

    .. warning::
        Constructing a grid is a collective call. Every rank of ``process_group`` must construct
        it with the same topology, and create its groups in the same order relative to other
        group-creating calls (``new_group``, `group_for`, ``init_device_mesh``), or the job
        hangs. Arguments are checked before the first collective, so a bad call raises
        everywhere instead of hanging.

    Ranks: a topology rank is a rank *within* ``process_group``; every rank the grid returns
    (`stage_to_global`, `get_data_parallel_group_ranks`, `p2p_groups`, `pp_group`,
    `dp_group`) is a *global* rank, usable with ``torch.distributed.send``/``recv``. The two
    coincide when the grid spans the default group. `to_global_rank` maps one to the other.

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
        TypeError: an argument has the wrong type.
    """

    def __init__(
        self,
        topology: ProcessTopology | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        if topology is not None and not isinstance(topology, ProcessTopology):
            raise TypeError(
                f"topology must be a ProcessTopology or None, got {type(topology).__name__}; "
                "build one with ProcessTopology(axes, dims)."
            )
        given: object = process_group
        if given is not None and not isinstance(given, ProcessGroup):
            if given == dist.GroupMember.NON_GROUP_MEMBER:
                raise RuntimeError(
                    f"global rank {dist.get_rank()} is not a member of process_group (new_group "
                    "returned its non-member marker here); construct the grid only on the ranks "
                    "of process_group."
                )
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup or None, got {given!r}."
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "PipelineParallelGrid needs an initialised torch.distributed; call "
                "torch.distributed.init_process_group(...) on every rank first."
            )
        group = dist.group.WORLD if process_group is None else process_group
        if not isinstance(group, ProcessGroup):
            raise RuntimeError("torch.distributed has no default process group.")
        rank = dist.get_rank(group)
        if rank < 0:
            raise RuntimeError(
                f"global rank {dist.get_rank()} is not a member of process_group (global ranks "
                f"{dist.get_process_group_ranks(group)}); construct the grid only on its ranks."
            )
        size = dist.get_world_size(group)
        topo = default_topology(size) if topology is None else topology
        if topo.world_size() != size:
            raise ValueError(
                f"{topo!r} has {topo.world_size()} ranks but the process group has {size}; "
                f"use a topology whose dims multiply to {size}, or a process group of "
                f"{topo.world_size()} ranks."
            )
        missing = [axis for axis in _REQUIRED_AXES if axis not in topo.axes]
        if missing:
            raise ValueError(
                f"a grid needs 'pipe' and 'data' axes, but {topo!r} lacks {missing}; add them "
                "with size 1, e.g. PipeDataParallelTopology(num_pp, num_dp)."
            )
        global_ranks = self._global_ranks_of(group, size)
        sub_group = size != dist.get_world_size()
        if sub_group and default_group_bound_to_device() and not uses_split_group():
            raise RuntimeError(
                "this torch cannot create groups inside a sub-group when the default group is "
                "bound to a device (init_process_group(device_id=...)): members would block "
                "splitting the default group's communicator. Build the grid on the default "
                "group, or initialise without device_id."
            )

        self._topology = topo
        self._process_group = none_if_default(group)
        self._global_ranks = global_ranks
        self._rank = rank
        self._coord = topo.get_coord(rank)
        self._cache = GroupCache(group, global_ranks, rank, size)
        if rank == 0:
            logger.info("building a pipeline grid for %r", topo)

        # [Note: one creation order] in _groups: the families, in a fixed order, on every rank.
        self._axis_ranks: dict[str, tuple[int, ...]] = {}
        for axis in topo.axes:
            self._cache.create([tuple(ranks) for ranks in topo.get_axis_comm_lists(axis)])
            self._axis_ranks[axis] = self._line_through(axis)
        data_dim = topo.get_dim("data")
        self._cache.create([tuple(topo.filter_match(data=d)) for d in range(data_dim)])
        self._model_ranks = tuple(topo.filter_match(data=self._coord.data))
        if "model" not in topo.axes:
            # The slice group of a topology without tensor slicing: each rank alone.
            self._cache.create([(r,) for r in range(size)])

    @staticmethod
    def _global_ranks_of(group: ProcessGroup, size: int) -> tuple[int, ...] | None:
        """Global rank of each group rank; None when they are equal (the default group)."""
        if group is dist.group.WORLD:
            return None
        ranks = tuple(dist.get_process_group_ranks(group))
        if ranks == tuple(range(size)):
            return None
        if list(ranks) != sorted(ranks):
            raise ValueError(
                f"process_group lists its global ranks out of order ({list(ranks)}); the "
                "groups of a grid order ranks by global rank, so create process_group with "
                "sorted ranks (torch.distributed.new_group's default)."
            )
        return ranks

    def _line_through(self, axis: str) -> tuple[int, ...]:
        """The topology ranks that differ from this rank only along ``axis``."""
        others = {a: v for a, v in self._coord.as_dict().items() if a != axis}
        return tuple(self._topology.filter_match(**others))

    # ------------------------------------------------------------------------ identity
    @property
    def process_group(self) -> ProcessGroup:
        """The group the grid lives in (the default group unless one was given)."""
        return default_if_none(self._process_group)

    def topology(self) -> ProcessTopology:
        """The grid's topology; its ranks are ranks within `process_group`."""
        return self._topology

    @property
    def coord(self) -> ProcessCoord:
        """This rank's coordinate in the topology."""
        return self._coord

    @property
    def topology_rank(self) -> int:
        """This process's rank in the topology (its rank within `process_group`)."""
        return self._rank

    @property
    def global_rank(self) -> int:
        """This process's rank in the default group."""
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        """The number of ranks in the grid (the size of `process_group`)."""
        return self._topology.world_size()

    def to_global_rank(self, topology_rank: int) -> int:
        """The global rank of a topology rank."""
        rank = self._topology._check_rank(topology_rank)
        return self._cache.to_global(rank)

    def to_topology_rank(self, global_rank: int) -> int:
        """The topology rank of a global rank; `ValueError` if it is not in the grid."""
        rank = _as_int(global_rank, "global_rank")
        if self._global_ranks is None:
            return self._topology._check_rank(rank)
        if rank not in self._global_ranks:
            raise ValueError(
                f"global rank {rank} is not in this grid's process group (global ranks "
                f"{list(self._global_ranks)})."
            )
        return self._global_ranks.index(rank)

    def get_global_rank(self) -> int:
        """This process's rank in the default group."""
        return self.global_rank

    def _to_global(self, ranks: Sequence[int]) -> list[int]:
        return [self._cache.to_global(r) for r in ranks]

    # ------------------------------------------------------------------ stages (pipe)
    @property
    def stage_id(self) -> int:
        """This rank's pipeline stage (its ``pipe`` coordinate)."""
        return self._coord.pipe

    @property
    def data_parallel_id(self) -> int:
        """This rank's pipeline replica (its ``data`` coordinate)."""
        return self._coord.data

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank runs the first pipeline stage."""
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank runs the last pipeline stage."""
        return self.stage_id == self.pipe_parallel_size - 1

    @property
    def pipe_parallel_size(self) -> int:
        """The number of pipeline stages."""
        return self._topology.get_dim("pipe")

    @property
    def data_parallel_size(self) -> int:
        """The number of pipeline replicas."""
        return self._topology.get_dim("data")

    @property
    def model_parallel_size(self) -> int:
        """The size of the ``model`` (tensor-slicing) axis, 1 without one (DeepSpeed's meaning).

        Not `get_model_parallel_world_size`, which counts pipe x model ranks.
        """
        return max(self._topology.get_dim("model"), 1)

    @property
    def slice_parallel_size(self) -> int:
        """The size of the ``model`` (tensor-slicing) axis, 1 without one."""
        return self.model_parallel_size

    def get_stage_id(self) -> int:
        """This rank's pipeline stage."""
        return self.stage_id

    def get_data_parallel_id(self) -> int:
        """This rank's pipeline replica."""
        return self.data_parallel_id

    def stage_to_global(self, stage_id: int, **coord: int) -> int:
        """The global rank running ``stage_id`` at this rank's other coordinates.

        Keyword arguments override other axes: ``grid.stage_to_global(1, data=0)`` is the
        rank of stage 1 in replica 0. The result is usable with ``torch.distributed.send``.
        """
        if "pipe" in coord:
            raise ValueError(
                f"stage_to_global() got pipe={coord['pipe']}; pass the stage as stage_id."
            )
        unknown = sorted(set(coord) - set(self._topology.axes))
        if unknown:
            raise ValueError(
                f"stage_to_global() got unknown axes {unknown}; the topology's axes are "
                f"{list(self._topology.axes)}."
            )
        target = self._coord.replace(pipe=stage_id, **coord)
        return self._cache.to_global(self._topology.get_rank(**target.as_dict()))

    @property
    def p2p_groups(self) -> list[list[int]]:
        """For every rank of the grid, ``[rank, rank of the next stage]`` as global ranks.

        The next stage of the last one wraps around to stage 0 (DeepSpeed's pairs), at the
        same data and model coordinates. Ordered by topology rank.
        """
        topo = self._topology
        stride = math.prod(topo.dims[topo.axes.index("pipe") + 1 :])
        last = topo.get_dim("pipe") - 1
        pairs = []
        for rank in range(topo.world_size()):
            stage = (rank // stride) % (last + 1)
            buddy = rank - last * stride if stage == last else rank + stride
            pairs.append([self._cache.to_global(rank), self._cache.to_global(buddy)])
        return pairs

    # ---------------------------------------------------------------------- groups
    def get_axis_group(self, axis: str) -> ProcessGroup:
        """This rank's group along ``axis``: the ranks that differ from it only there."""
        return self._group(self._axis_ranks_of(axis))

    def get_axis_group_ranks(self, axis: str) -> list[int]:
        """The global ranks of `get_axis_group`, ordered by their coordinate along ``axis``."""
        return self._to_global(self._axis_ranks_of(axis))

    def _axis_ranks_of(self, axis: str) -> tuple[int, ...]:
        if axis not in self._axis_ranks:
            raise ValueError(
                f"the grid has no axis {axis!r}; its axes are {list(self._topology.axes)}."
            )
        return self._axis_ranks[axis]

    def _group(self, ranks: tuple[int, ...]) -> ProcessGroup:
        group = self._cache.get(ranks)
        if group is None:  # pragma: no cover - every rank is in its own lines
            raise RuntimeError(f"topology rank {self._rank} has no group for ranks {ranks}.")
        return group

    def get_pipe_parallel_rank(self) -> int:
        """This rank's stage: its rank in the pipe group."""
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        """The number of stages."""
        return self.pipe_parallel_size

    def get_pipe_parallel_group(self) -> ProcessGroup:
        """The ranks of this rank's pipeline: all stages at its data and model coordinates."""
        return self.get_axis_group("pipe")

    @property
    def pp_group(self) -> list[int]:
        """The global ranks of the pipe group, by stage."""
        return self.get_axis_group_ranks("pipe")

    def get_data_parallel_rank(self) -> int:
        """This rank's replica: its rank in the data group."""
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        """The number of replicas."""
        return self.data_parallel_size

    def get_data_parallel_group(self) -> ProcessGroup:
        """The replicas of this rank's stage (and model slice): where gradients are reduced."""
        return self.get_axis_group("data")

    def get_data_parallel_group_ranks(self) -> list[int]:
        """The global ranks of the data group, by replica."""
        return self.get_axis_group_ranks("data")

    @property
    def dp_group(self) -> list[int]:
        """The global ranks of the data group, by replica."""
        return self.get_data_parallel_group_ranks()

    def get_model_parallel_rank(self) -> int:
        """This rank's position in its model-parallel group (DeepSpeed: pipe x model)."""
        return self._model_ranks.index(self._rank)

    def get_model_parallel_world_size(self) -> int:
        """The number of ranks holding one replica of the model: stages x slices."""
        return len(self._model_ranks)

    def get_model_parallel_group(self) -> ProcessGroup:
        """All ranks of this rank's replica (every stage and slice), e.g. to agree on overflow."""
        return self._group(self._model_ranks)

    def get_slice_parallel_rank(self) -> int:
        """This rank's tensor slice (its ``model`` coordinate), 0 without a model axis."""
        if "model" not in self._topology.axes:
            return 0
        return self._coord.model

    def get_slice_parallel_world_size(self) -> int:
        """The number of tensor slices, 1 without a model axis."""
        return self.slice_parallel_size

    def get_slice_parallel_group(self) -> ProcessGroup:
        """The slices of this rank's layer; a single-rank group without a model axis."""
        if "model" in self._topology.axes:
            return self.get_axis_group("model")
        return self._group((self._rank,))

    # ------------------------------------------------- DeepSpeed's attribute spellings
    # DeepSpeed's grid exposes these as plain attributes that user code reads directly; here
    # they are read-only views of the accessors above, with the same meanings.

    @property
    def _topo(self) -> ProcessTopology:
        """The topology (DeepSpeed's attribute name); see `topology()`."""
        return self._topology

    def _is_grid_valid(self) -> bool:
        """Whether the topology's dims multiply to the size of `process_group`.

        DeepSpeed compares with the default group; this grid lives in `process_group`, so
        that is the size it must fill. Construction refuses any other grid, so this holds for
        every grid that exists while its process group does.
        """
        return math.prod(self._topology.dims) == dist.get_world_size(self.process_group)

    @property
    def pp_proc_group(self) -> ProcessGroup:
        """This rank's pipe group; see `get_pipe_parallel_group`."""
        return self.get_pipe_parallel_group()

    @property
    def dp_proc_group(self) -> ProcessGroup:
        """This rank's data group; see `get_data_parallel_group`."""
        return self.get_data_parallel_group()

    @property
    def slice_proc_group(self) -> ProcessGroup:
        """This rank's slice (tensor-parallel) group; see `get_slice_parallel_group`."""
        return self.get_slice_parallel_group()

    @property
    def ds_model_proc_group(self) -> ProcessGroup:
        """All ranks sharing this rank's data coordinate; see `get_model_parallel_group`."""
        return self.get_model_parallel_group()

    @property
    def ds_model_rank(self) -> int:
        """This rank's position among the pipe x model ranks of its replica."""
        return self.get_model_parallel_rank()

    @property
    def ds_model_world_size(self) -> int:
        """The number of ranks holding one replica of the model: stages x slices."""
        return self.get_model_parallel_world_size()

    @property
    def dp_groups(self) -> list[list[int]]:
        """Every data group of the grid as global ranks, in `get_axis_comm_lists` order."""
        return [self._to_global(ranks) for ranks in self._topology.get_axis_comm_lists("data")]

    @property
    def pipe_groups(self) -> list[list[int]]:
        """Every pipe group of the grid as global ranks, in `get_axis_comm_lists` order."""
        return [self._to_global(ranks) for ranks in self._topology.get_axis_comm_lists("pipe")]

    @property
    def slice_group(self) -> list[int]:
        """The global ranks of this rank's slice group; just this rank without a model axis."""
        if "model" in self._topology.axes:
            return self.get_axis_group_ranks("model")
        return self._to_global((self._rank,))

    # Megatron spellings of the same accessors.
    get_tensor_model_parallel_rank = get_slice_parallel_rank
    get_tensor_model_parallel_world_size = get_slice_parallel_world_size
    get_tensor_model_parallel_group = get_slice_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group

    def group_for(self, ranks: Sequence[int]) -> ProcessGroup | None:
        """The process group of a set of topology ranks, created on first use and cached.

        For groups that later features need, such as the stages sharing a tied weight. Ranks
        are deduplicated and sorted, so ``[3, 0]`` and ``[0, 3, 3]`` name the same group. Returns
        None on ranks that are not members.

        .. warning::
            A collective call over `process_group`: every rank of the grid must call it with the
            same ranks, in the same order relative to other group-creating calls, members or
            not, or the job hangs. (A cached set makes no call on any rank.)

        Raises:
            ValueError: ``ranks`` is empty or names a rank outside the topology (checked before
                any communication).
        """
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
            raise TypeError(f"ranks must be a sequence of topology ranks, got {ranks!r}.")
        key = tuple(sorted({self._topology._check_rank(r) for r in ranks}))
        if not key:
            raise ValueError("group_for() got no ranks; pass at least one topology rank.")
        self._cache.create([key])
        if self._rank not in key:
            return None
        return self._group(key)

    @property
    def group_creation_calls(self) -> int:
        """How many collective group-creating calls this grid has made on this rank."""
        return self._cache.collective_calls

    @property
    def local_group_creation_calls(self) -> int:
        """How many single-rank groups this rank created on its own (no other rank took part)."""
        return self._cache.local_calls

    def to_device_mesh(self, device_type: str) -> DeviceMesh:
        """The grid as a `torch.distributed.DeviceMesh` with ``mesh_dim_names`` = the axes.

        Reuses the grid's axis groups, so it creates no group and does not communicate. The
        mesh holds global ranks in the topology's layout.
        """
        from torch.distributed.device_mesh import DeviceMesh

        topo = self._topology
        mesh = torch.tensor(self._to_global(range(topo.world_size())), dtype=torch.int)
        groups = [self.get_axis_group(axis) for axis in topo.axes]
        return DeviceMesh.from_group(
            groups, device_type, mesh=mesh.reshape(topo.dims), mesh_dim_names=topo.axes
        )

    def __repr__(self) -> str:
        return (
            f"PipelineParallelGrid(topology={self._topology!r}, topology_rank={self._rank}, "
            f"coord={self._coord!r})"
        )
