"""DeepSpeed's and Megatron's names for what the grid's core answers by axis.

Code written for DeepSpeed reads a grid through its ``PipelineParallelGrid`` attributes and
passes it on as an ``mpu`` (model-parallel unit); Megatron-style code asks ``parallel_state``.
`DeepSpeedGridNames` gives `PipelineParallelGrid` all of those spellings, each a line or two
over the core (`pipetopo._grid.GridCore`), so there is one implementation of each answer and
the core stays small. Blocks are headed by the name's source.

The spellings disagree with each other in shape, and we keep every disagreement, because code
that uses them relies on it. Each such name says so in its docstring:

* ``pp_group``, ``dp_group``, ``slice_group`` are lists of global ranks, while
  ``pp_proc_group``, ``dp_proc_group``, ``slice_proc_group`` are process groups.
* "model parallel" means two things: ``model_parallel_size`` is the size of the ``model``
  (tensor-slicing) axis, while ``get_model_parallel_*()`` and ``ds_model_*`` are about a whole
  replica, pipe x model ranks.
* ``world_size`` and ``global_rank`` are properties, ``topology()`` and ``get_global_rank()``
  methods, and ``ProcessTopology.world_size()`` a method.
* Groups are real ``ProcessGroup`` objects (the default group included) and rank lists are
  fresh lists, where the core hands out None for the default group and tuples.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipetopo._groups import default_if_none

if TYPE_CHECKING:
    # Checked as a subclass of the core it is mixed into, so every name here is checked against
    # the core's signatures; at run time a plain mixin, which keeps the import one-way (_grid
    # imports this module).
    from pipetopo._grid import GridCore as _Core
    from pipetopo._topology import ProcessTopology
else:
    _Core = object


class DeepSpeedGridNames(_Core):
    """DeepSpeed's grid and MPU names and Megatron's ``parallel_state`` names, over the core.

    Mixed into `PipelineParallelGrid`; see the module docstring for where the names disagree.
    """

    # ---------------------------------------- DeepSpeed: deepspeed.runtime.pipe.topology's grid
    # DeepSpeed's grid keeps these as plain attributes that user code reads; here they are
    # read-only views of the core.

    @property
    def _topo(self) -> ProcessTopology:
        """The topology, as `topology()` (DeepSpeed's attribute name)."""
        return self.topology()

    @property
    def global_rank(self) -> int:
        """This process's rank in the default group. `get_global_rank()` is the method form."""
        return dist.get_rank()

    def get_global_rank(self) -> int:
        """This process's rank in the default group; the `global_rank` property as a method."""
        return self.global_rank

    @property
    def world_size(self) -> int:
        """The number of ranks in the grid (the size of `process_group`).

        A property here, as in DeepSpeed's grid, though ``ProcessTopology.world_size()`` is a
        method. DeepSpeed counts the default group; this grid counts its own process group.
        """
        return self.topology().world_size()

    def get_stage_id(self) -> int:
        """This rank's pipeline stage: `stage_id` (also `get_pipe_parallel_rank()`)."""
        return self.stage_id

    @property
    def data_parallel_id(self) -> int:
        """This rank's pipeline replica: ``axis_rank("data")``."""
        return self.axis_rank("data")

    def get_data_parallel_id(self) -> int:
        """This rank's pipeline replica: `data_parallel_id` as a method."""
        return self.data_parallel_id

    @property
    def pipe_parallel_size(self) -> int:
        """The number of pipeline stages: `num_stages`."""
        return self.num_stages

    @property
    def data_parallel_size(self) -> int:
        """The number of pipeline replicas: ``axis_size("data")``."""
        return self.axis_size("data")

    @property
    def model_parallel_size(self) -> int:
        """The size of the ``model`` (tensor-slicing) axis, 1 without one (DeepSpeed's meaning).

        Not `get_model_parallel_world_size()`, which counts a whole replica: pipe x model ranks.
        DeepSpeed uses the two meanings side by side.
        """
        return self.axis_size("model") if "model" in self.axes else 1

    @property
    def slice_parallel_size(self) -> int:
        """The size of the ``model`` axis, 1 without one: the same as `model_parallel_size`."""
        return self.model_parallel_size

    @property
    def pp_group(self) -> list[int]:
        """The global ranks of this rank's pipeline, by stage: ``list(axis_ranks("pipe"))``.

        A list of ranks, while `pp_proc_group` is the process group of the same ranks.
        """
        return list(self.axis_ranks("pipe"))

    @property
    def dp_group(self) -> list[int]:
        """The global ranks of this rank's data group, by replica: ``list(axis_ranks("data"))``.

        A list of ranks, while `dp_proc_group` is the process group of the same ranks.
        """
        return list(self.axis_ranks("data"))

    @property
    def slice_group(self) -> list[int]:
        """The global ranks of this rank's slice group; ``[global rank]`` without a model axis.

        A list of ranks, while `slice_proc_group` is the process group of the same ranks.
        """
        if "model" in self.axes:
            return list(self.axis_ranks("model"))
        return [self.to_global_rank(self.topology_rank)]

    @property
    def pp_proc_group(self) -> ProcessGroup:
        """This rank's pipe group, a ``ProcessGroup`` (`pp_group` is its ranks).

        The same as `get_pipe_parallel_group()`.
        """
        return self.get_pipe_parallel_group()

    @property
    def dp_proc_group(self) -> ProcessGroup:
        """This rank's data group, a ``ProcessGroup`` (`dp_group` is its ranks).

        The same as `get_data_parallel_group()`.
        """
        return self.get_data_parallel_group()

    @property
    def slice_proc_group(self) -> ProcessGroup:
        """This rank's slice group, a ``ProcessGroup`` (`slice_group` is its ranks).

        The same as `get_slice_parallel_group()`.
        """
        return self.get_slice_parallel_group()

    @property
    def ds_model_proc_group(self) -> ProcessGroup:
        """This rank's replica (pipe x model ranks): `get_model_parallel_group()`."""
        return self.get_model_parallel_group()

    @property
    def ds_model_rank(self) -> int:
        """This rank's position among its replica's pipe x model ranks.

        `get_model_parallel_rank()`; not a coordinate along the ``model`` axis.
        """
        return self.get_model_parallel_rank()

    @property
    def ds_model_world_size(self) -> int:
        """The pipe x model ranks of one replica: `get_model_parallel_world_size()`.

        Not `model_parallel_size`, the size of the ``model`` axis alone.
        """
        return self.get_model_parallel_world_size()

    @property
    def pipe_groups(self) -> list[list[int]]:
        """Every pipe line of the grid as global ranks, in `get_axis_comm_lists` order.

        Fresh lists on every read.
        """
        return self._global_lists("pipe")

    @property
    def dp_groups(self) -> list[list[int]]:
        """Every data line of the grid as global ranks, in `get_axis_comm_lists` order.

        Fresh lists on every read.
        """
        return self._global_lists("data")

    def _global_lists(self, axis: str) -> list[list[int]]:
        lines = self.topology().get_axis_comm_lists(axis)
        return [[self.to_global_rank(r) for r in line] for line in lines]

    @property
    def p2p_groups(self) -> list[list[int]]:
        """For every rank of the grid, ``[rank, rank of the next stage]`` as global ranks.

        Unlike `next_stage_rank`, the next stage of the last one wraps around to stage 0
        (DeepSpeed's pairs), at the same data and model coordinates. Ordered by topology rank.
        """
        topo = self.topology()
        # Row-major layout: the next stage is one pipe stride on; arithmetic, because this is
        # a list over the whole grid.
        stride = math.prod(topo.dims[topo.axes.index("pipe") + 1 :])
        stages = self.num_stages
        pairs = []
        for rank in range(topo.world_size()):
            last = (rank // stride) % stages == stages - 1
            buddy = rank - (stages - 1) * stride if last else rank + stride
            pairs.append([self.to_global_rank(rank), self.to_global_rank(buddy)])
        return pairs

    def _is_grid_valid(self) -> bool:
        """Whether the topology's dims multiply to the size of `process_group`.

        DeepSpeed compares with the default group; this grid lives in `process_group`, so
        that is the size it must fill. Construction refuses any other grid, so this holds for
        every grid that exists while its process group does.
        """
        return math.prod(self.topology().dims) == dist.get_world_size(self.process_group)

    # ------------------------------- DeepSpeed: the MPU interface (the grid passed as ``mpu``)
    # Groups are real ProcessGroups, as DeepSpeed hands them out: the core's kept form (None for
    # the default group) is turned back as it is read, through get_axis_group for every axis.

    def get_pipe_parallel_rank(self) -> int:
        """This rank's stage, its rank in the pipe group: `stage_id`."""
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        """The number of stages: `num_stages`."""
        return self.num_stages

    def get_pipe_parallel_group(self) -> ProcessGroup:
        """All stages at this rank's data and model coordinates, as a ``ProcessGroup``.

        ``axis_group("pipe")``, but the default group itself instead of None.
        """
        return self.get_axis_group("pipe")

    def get_data_parallel_rank(self) -> int:
        """This rank's replica, its rank in the data group: ``axis_rank("data")``."""
        return self.axis_rank("data")

    def get_data_parallel_world_size(self) -> int:
        """The number of replicas: ``axis_size("data")``."""
        return self.axis_size("data")

    def get_data_parallel_group(self) -> ProcessGroup:
        """The replicas of this rank's stage and slice, where gradients are reduced.

        ``axis_group("data")``, but the default group itself instead of None.
        """
        return self.get_axis_group("data")

    def get_data_parallel_group_ranks(self) -> list[int]:
        """The global ranks of the data group, by replica: the same list as `dp_group`."""
        return list(self.axis_ranks("data"))

    def get_model_parallel_rank(self) -> int:
        """This rank's position in its replica (pipe x model ranks, by topology rank).

        DeepSpeed's "model parallel" is the whole replica, so this is not `axis_rank`
        ("model"); see `model_parallel_size`.
        """
        return self.replica_ranks().index(self.to_global_rank(self.topology_rank))

    def get_model_parallel_world_size(self) -> int:
        """The ranks of one replica, stages x slices: ``len(replica_ranks())``.

        Not `model_parallel_size`, which is the size of the ``model`` axis alone.
        """
        return len(self.replica_ranks())

    def get_model_parallel_group(self) -> ProcessGroup:
        """All ranks of this rank's replica (every stage and slice), e.g. to agree on overflow.

        `replica_group()`, but the default group itself instead of None.
        """
        return default_if_none(self.replica_group())

    def get_slice_parallel_rank(self) -> int:
        """This rank's tensor slice, ``axis_rank("model")``; 0 without a model axis.

        Where the core raises `ValueError` for an absent axis, DeepSpeed's names treat a
        missing model axis as one slice.
        """
        return self.axis_rank("model") if "model" in self.axes else 0

    def get_slice_parallel_world_size(self) -> int:
        """The number of tensor slices, 1 without a model axis: `slice_parallel_size`."""
        return self.slice_parallel_size

    def get_slice_parallel_group(self) -> ProcessGroup:
        """The slices of this rank's layer as a ``ProcessGroup``; this rank alone without a
        model axis (``axis_group("model")`` or ``group_of([topology_rank])``)."""
        if "model" in self.axes:
            return self.get_axis_group("model")
        return default_if_none(self.group_of([self.topology_rank]))

    # --------------------------------------- pipestack's own names from before the core
    # Kept for code written against them; the core spells them axis_group / axis_ranks.

    def get_axis_group(self, axis: str) -> ProcessGroup:
        """This rank's group along ``axis``, as a ``ProcessGroup``.

        ``axis_group(axis)``, but the default group itself instead of None.
        """
        return default_if_none(self.axis_group(axis))

    def get_axis_group_ranks(self, axis: str) -> list[int]:
        """The global ranks of `get_axis_group`, by coordinate: ``list(axis_ranks(axis))``."""
        return list(self.axis_ranks(axis))

    # ------------------------------------------------------ Megatron: megatron.core.parallel_state
    # Megatron's "tensor model parallel" is DeepSpeed's slice, its "pipeline model parallel"
    # DeepSpeed's pipe; same answers, same types.
    get_tensor_model_parallel_rank = get_slice_parallel_rank
    get_tensor_model_parallel_world_size = get_slice_parallel_world_size
    get_tensor_model_parallel_group = get_slice_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group
