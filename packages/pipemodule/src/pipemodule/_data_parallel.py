"""Data parallelism across pipeline replicas: torch's DDP or FSDP2 around each local stage.

[Note: the data-parallel average is applied once]
A mode is chosen once per module by :func:`shard_data_parallel`, before the optimizer is made.
What each stage's ``PipelineStage`` runs is then a wrapper, and torch's stage code drives it:

* ``'replicate'``: ``DistributedDataParallel`` over the grid's data group. The stage runs every
  micro-batch but the last under ``no_sync`` and prepares DDP's reducer for the last one, so the
  bucketed all-reduce (an average: DDP divides by the group size) overlaps that backward and the
  stages still running; gradients are bucket views (``gradient_as_bucket_view``), never copied.
* ``'fsdp'`` / ``'zero2'``: ``fully_shard`` over a 1-D mesh of the data group, one FSDP unit per
  stage. The stage accumulates unsharded gradients without sync and its ``perform_reduce_grad``
  (at the stage's last backward) reduce-scatters them: an average, into sharded gradients.
  ``'zero2'`` keeps parameters gathered from forward to backward (``reshard_after_forward=False``).

A schedule that splits backward (InterleavedZeroBubble, ZBVZeroBubble, DualPipeV) runs each
stage's input pass (I) and weight pass (W) as separate autograd calls, which DDP's reducer cannot
follow (it would mark parameters ready twice). Those stages run the unwrapped stage instead, and
their gradients are views of a few flat buckets per stage (:class:`ReplicaBuckets`): when a
stage's last W finishes (torch's REDUCE_GRAD action) its buckets are all-reduced in place,
asynchronously, while the other stages still compute; the trainer waits before clipping.

Under DDP, tied parameters are kept out of the wrapper (DDP's ignore list): after the schedule
they are summed over the tie group and averaged over the data group by
:func:`average_data_parallel_gradients`, as before. Every other gradient was averaged by its
wrapper, once. Schedules are built with ``scale_grads=False`` and the loss divided by the
micro-batch count, so no wrapper or schedule divides a second time.

[Note: tied parameters under FSDP]
The copies of a tie sit on stages of one pipeline replica, so they share a data coordinate, and
FSDP cuts every copy the same way (dim 0 over the same mesh size): each holder's shard ``d`` is
the same slice. After FSDP's reduce-scatter each holder has that slice of its own copy's
replica-averaged gradient, and :func:`sum_tied_gradients` sums the local shards over the tie
group: the slice of the averaged sum, the same quantity on every holder, which then takes the
same sharded optimizer step. Ties are thus sharded like any parameter. The one exception is a
tie two stages of one rank share ('v' placement): one tensor cannot belong to two FSDP units,
so it stays whole (``ignored_params``), summed and then averaged after the schedule as in DDP.

[Note: bf16 compute, fp32 master weights and reductions]
``precision='bf16'`` runs each stage under ``torch.autocast(bf16)`` and casts its bf16 outputs
back to float32, so the activations that cross stages keep the dtypes the stage shapes were
planned with. Parameters, gradients, optimizer state and every reduction stay float32 in
'replicate' (autocast casts weights per op; gradients land on the float32 parameters). Under
FSDP, ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`` also gathers parameters
in bf16, and autocast still covers the tied (unsharded, float32) parameters.

[Note: FSDP and the split backward]
torch's input pass (``stage_backward_input``) collects the grad accumulators of
``submod.parameters()`` *before* it runs autograd. With ``reshard_after_forward=True`` FSDP2's
post-forward hook has swapped the module's parameters back to the sharded DTensors by then, and
the graph holds the unsharded ones: none of the collected accumulators is in the graph, the
pass records no parameter groups, and the weight pass then adds nothing (only stage 0, whose W
is a full backward, kept its gradients). FSDP's pre-backward hook unshards during the I pass,
too late. So a stage unshards explicitly before its I and W passes (the same all-gather the hook
would run, a moment earlier; a no-op when already gathered), and the unsharded parameters, one
object per parameter for FSDP's lifetime, are what both passes see.

[Note: one reduction per accumulation window]
With ``accumulation_steps=k`` the trainer turns :class:`GradientSync` off for the first k-1
calls: stages then pass ``last_backward=False`` to torch (DDP runs under ``no_sync``), skip
REDUCE_GRAD (FSDP keeps accumulating unsharded gradients; the stage is only resharded) and launch
no bucket. The last call reduces what the window accumulated, once.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map_only

from pipemodule._module import PipelineModule
from pipemodule._stage.collective import gather_objects

__all__ = [
    "DATA_PARALLEL_MODES",
    "PRECISIONS",
    "DataParallelPlan",
    "DataParallelStage",
    "GradientSync",
    "ReplicaBuckets",
    "StageReduction",
    "data_parallel_of",
    "gradient_sync",
    "shard_data_parallel",
    "stage_modules",
    "stage_modules_for",
]

DATA_PARALLEL_MODES = ("replicate", "fsdp", "zero2")
"""``'replicate'`` (DDP), ``'fsdp'`` (FSDP2, ZeRO-3-like), ``'zero2'`` (FSDP2 without resharding
parameters after forward: ZeRO-2-like)."""

PRECISIONS = ("fp32", "bf16")

_PLAN_ATTRIBUTE = "_pipestack_data_parallel"


class DataParallelStage(torch.nn.Module):
    """One local stage as the data-parallel wrapper runs it: optionally under bf16 autocast.

    FSDP is applied to this wrapper rather than to the stage, so a ``PipelineModule`` holding
    one stage keeps its class and its parameter names (FSDP2 swaps the class of what it wraps).
    """

    def __init__(self, stage: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.stage = stage
        self.compute_dtype = compute_dtype

    def forward(self, *inputs: Any) -> Any:
        dtype = self.compute_dtype
        if dtype is None:
            return self.stage(*inputs)
        device_type = _device_type(self.stage)
        with torch.autocast(device_type, dtype=dtype):
            outputs = self.stage(*inputs)
        # Back to float32 at the stage boundary: see [Note: bf16 compute, fp32 master weights].
        return tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype == dtype else t, outputs)


@dataclass
class GradientSync:
    """Whether this ``train_step`` call reduces over replicas, and what is still in flight.

    See [Note: one reduction per accumulation window]. Mutable, one per plan.
    """

    enabled: bool = True
    pending: list[ReplicaBuckets] = field(default_factory=list)
    """Buckets launched during this call's schedule, waited for by :meth:`finish`."""

    def finish(self) -> None:
        """Wait for every bucket launched and turn its sums into averages (local + wait)."""
        pending, self.pending = self.pending, []
        for buckets in pending:
            buckets.wait()


@contextmanager
def gradient_sync(module: PipelineModule, enabled: bool) -> Iterator[None]:
    """Reduce over replicas during the enclosed schedule only when ``enabled`` (accumulation)."""
    plan = data_parallel_of(module)
    if plan is None:
        yield
        return
    plan.sync.enabled = enabled
    try:
        yield
    finally:
        plan.sync.enabled = True


class ReplicaBuckets:
    """One stage's gradients as views of flat buffers, all-reduced in place and asynchronously.

    Buffers are made at the first launch; from then on each gradient is a view of its bucket,
    so autograd accumulates into the buffer and a launch copies nothing. A gradient replaced
    since (``zero_grad(set_to_none=True)``) is copied into its bucket and the view restored.
    Collective over ``group`` at :meth:`launch`: data peers hold the same stage, so they
    launch the same buckets in the same order.
    """

    def __init__(
        self,
        parameters: Sequence[torch.nn.Parameter],
        group: dist.ProcessGroup,
        replicas: int,
        bucket_cap_mb: float,
    ) -> None:
        self._group = group
        self._replicas = replicas
        cap = int(bucket_cap_mb * 2**20)
        # Reverse order: the last layers' gradients are complete first, as in DDP.
        self._members: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in reversed(parameters):
            current = self._members[-1] if self._members else None
            nbytes = p.numel() * p.element_size()
            fits = current is not None and size + nbytes <= cap
            if (
                current is None
                or not fits
                or (current[0].dtype, current[0].device)
                != (
                    p.dtype,
                    p.device,
                )
            ):
                self._members.append([p])
                size = nbytes
            else:
                current.append(p)
                size += nbytes
        self._buffers: list[torch.Tensor] = []
        self._views: list[list[torch.Tensor]] = []
        self._works: list[dist.Work] = []

    @property
    def count(self) -> int:
        """How many all-reduces one launch runs."""
        return len(self._members)

    def _attach(self) -> None:
        if not self._buffers:
            for members in self._members:
                first = members[0]
                buffer = torch.zeros(
                    sum(p.numel() for p in members), dtype=first.dtype, device=first.device
                )
                self._buffers.append(buffer)
                views, offset = [], 0
                for p in members:
                    views.append(buffer[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
                self._views.append(views)
        for members, views in zip(self._members, self._views, strict=True):
            for p, view in zip(members, views, strict=True):
                if p.grad is not view:
                    if p.grad is None:
                        view.zero_()
                    else:
                        view.copy_(p.grad)
                    p.grad = view

    def launch(self) -> None:
        """Start the in-place sum of every bucket over the replicas (collective, async)."""
        self._attach()
        self._works = [
            work
            for buffer in self._buffers
            if (work := dist.all_reduce(buffer, group=self._group, async_op=True)) is not None
        ]

    def wait(self) -> None:
        """Wait for the sums and divide them by the replica count: the average."""
        works, self._works = self._works, []
        for work in works:
            work.wait()
        for buffer in self._buffers:
            buffer.div_(self._replicas)


@dataclass(frozen=True)
class DataParallelPlan:
    """How a module's data-parallel replicas are reduced; made by :func:`shard_data_parallel`."""

    mode: str
    precision: str
    replicas: int
    overlap: bool
    """Whether 'replicate' reduces during backward (DDP) rather than after the schedule."""
    stages: tuple[torch.nn.Module, ...]
    """What each local stage's ``PipelineStage`` runs, in ``module.stage_ids`` order."""
    reduced_after: tuple[torch.Tensor, ...]
    """Parameters no wrapper reduces (tied ones): averaged after the schedule."""
    split_stages: tuple[torch.nn.Module, ...] = ()
    """What each stage runs under a schedule that splits backward (no DDP wrapper)."""
    buckets: tuple[ReplicaBuckets | None, ...] = ()
    """Each stage's buckets under a split-backward schedule ('replicate' with overlap)."""
    sync: GradientSync = field(default_factory=lambda: GradientSync())
    """Whether this call reduces (accumulation), and the reductions still in flight."""

    @property
    def shards(self) -> bool:
        """Whether parameters, gradients and optimizer state are sharded (DTensors)."""
        return self.mode != "replicate" and self.replicas > 1


def data_parallel_of(module: PipelineModule) -> DataParallelPlan | None:
    """The plan :func:`shard_data_parallel` made for ``module``, or None."""
    plan = module.__dict__.get(_PLAN_ATTRIBUTE)
    return plan if isinstance(plan, DataParallelPlan) else None


def stage_modules(module: PipelineModule) -> tuple[torch.nn.Module, ...]:
    """What each local stage's ``PipelineStage`` runs: the wrappers of the plan, or the stages."""
    plan = data_parallel_of(module)
    return module.stages if plan is None else plan.stages


def stage_modules_for(module: PipelineModule, split_backward: bool) -> list[StageReduction]:
    """Each local stage's module and reduction, for a schedule that splits backward or not."""
    plan = data_parallel_of(module)
    if plan is None:
        return [StageReduction(stage, None, None) for stage in module.stages]
    if not split_backward or not plan.split_stages:
        return [StageReduction(stage, None, plan.sync) for stage in plan.stages]
    return [
        StageReduction(stage, buckets, plan.sync)
        for stage, buckets in zip(plan.split_stages, plan.buckets, strict=True)
    ]


@dataclass(frozen=True)
class StageReduction:
    """What one ``PipelineStage`` runs and how its gradients reach the other replicas."""

    module: torch.nn.Module
    buckets: ReplicaBuckets | None
    """Launched when the stage's last backward finishes (split backward under 'replicate')."""
    sync: GradientSync | None


def _device_type(module: torch.nn.Module) -> str:
    for parameter in module.parameters():
        return parameter.device.type
    return "cpu"


def _check(module: object, mode: object, precision: object, bucket_cap_mb: object) -> None:
    if not isinstance(module, PipelineModule):
        raise TypeError(
            f"module={module!r} is a {type(module).__name__}; pass the PipelineModule to shard"
        )
    if not isinstance(mode, str) or mode not in DATA_PARALLEL_MODES:
        raise ValueError(
            f"mode={mode!r} is not a data-parallel mode; use one of {list(DATA_PARALLEL_MODES)}"
        )
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not known; use 'fp32', or 'bf16' for bf16 compute with "
            f"float32 master weights and reductions"
        )
    if (
        isinstance(bucket_cap_mb, bool)
        or not isinstance(bucket_cap_mb, (int, float))
        or not bucket_cap_mb > 0
    ):
        raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} must be a number > 0 (MiB per bucket)")
    if data_parallel_of(module) is not None:
        raise ValueError(
            "shard_data_parallel was already applied to this module; call it once, after "
            "building the PipelineModule and before making the optimizer"
        )


def shard_data_parallel(
    module: PipelineModule,
    mode: str = "replicate",
    *,
    precision: str = "fp32",
    bucket_cap_mb: float = 25.0,
    overlap: bool = True,
) -> DataParallelPlan:
    """Choose how ``module``'s data-parallel replicas share work; call before making the optimizer.

    ``mode``: ``'replicate'`` (default) keeps a full copy of the stage on every replica and
    averages gradients with DDP's bucketed all-reduce, overlapped with each stage's last
    backward; ``'fsdp'`` shards parameters, gradients and optimizer state over the replicas with
    FSDP2, one unit per stage (ZeRO-3-like); ``'zero2'`` is ``'fsdp'`` without resharding the
    parameters between forward and backward (more memory, fewer all-gathers). Under a schedule
    that splits backward, 'replicate' all-reduces each stage's gradient buckets as its last
    weight pass finishes instead of running DDP. Every mode runs every schedule. Tied parameters
    stay whole in every mode (see [Note: the data-parallel average is applied once]).

    ``precision='bf16'``: bf16 compute with float32 master weights, gradients and reductions.
    ``bucket_cap_mb``: DDP's bucket size. ``overlap=False`` ('replicate' only) keeps the
    previous reduction: one all-reduce of a flattened copy of every gradient after the schedule
    (:func:`average_data_parallel_gradients`), for comparison.

    Under FSDP the module's parameters become DTensors, so the optimizer must be made
    afterwards, from ``module.parameters()``. :class:`~pipemodule.PipelineTrainer` applies
    ``'replicate'`` itself when this was not called. Collective over the grid's process group
    (the modes are compared; DDP and FSDP set up over the data group).

    Raises:
        TypeError: ``module`` is not a PipelineModule.
        ValueError: an unknown mode or precision, a bad bucket size, or a module already
            sharded (before any collective).
        RuntimeError: ranks passed different modes or precisions.
    """
    _check(module, mode, precision, bucket_cap_mb)
    if not isinstance(overlap, bool) or (not overlap and mode != "replicate"):
        raise ValueError(
            f"overlap={overlap!r} with mode={mode!r}: overlap is a bool, and only 'replicate' "
            f"can reduce after the schedule (overlap=False); FSDP always reduces per stage"
        )
    grid = module.grid
    seen = gather_objects((mode, precision), grid.process_group, "shard_data_parallel")
    if len(set(seen)) != 1:
        raise RuntimeError(
            f"ranks passed different data-parallel settings (mode, precision): {sorted(set(seen))}"
            f"; pass the same mode and precision on every rank"
        )
    replicas = grid.axis_size("data")
    compute_dtype = torch.bfloat16 if precision == "bf16" else None
    tied = _unique([tensor for link in module.tied_comms.values() for tensor in link.tensors()])
    tied_ids = {id(tensor) for tensor in tied}
    wrapped = [DataParallelStage(stage, compute_dtype) for stage in module.stages]
    stages: list[torch.nn.Module] = list(wrapped)
    # Counted by stage, not by tie link: a tie held only by this rank's stages has no link.
    holders: dict[int, int] = {}
    for stage in wrapped:
        for p in stage.parameters():
            holders[id(p)] = holders.get(id(p), 0) + 1
    shared_ids = {id(p) for p in module.parameters() if holders.get(id(p), 0) > 1}
    # In module order: data peers flatten these alike for one all-reduce.
    shared_list = [p for p in module.parameters() if id(p) in shared_ids]
    kept_whole = tied_ids | shared_ids
    if not overlap:
        reduced_after = [p for p in module.parameters() if p.requires_grad]
    else:
        reduced_after = [p for p in module.parameters() if id(p) in kept_whole]
    split_stages: list[torch.nn.Module] = []
    buckets: list[ReplicaBuckets | None] = []
    if replicas > 1 and mode == "replicate" and overlap:
        group = _real_group(grid.axis_group("data"))
        stages = [_replicate(stage, kept_whole, group, bucket_cap_mb) for stage in wrapped]
        split_stages = list(wrapped)
        for stage in wrapped:
            reduced = [p for p in stage.parameters() if p.requires_grad and id(p) not in kept_whole]
            buckets.append(
                ReplicaBuckets(reduced, group, replicas, bucket_cap_mb) if reduced else None
            )
    elif replicas > 1 and mode != "replicate":
        # See [Note: tied parameters under FSDP]: only a tie two local stages share stays whole.
        shared = set(shared_list)
        mesh = DeviceMesh.from_group(
            _real_group(grid.axis_group("data")), device_type=module.device.type
        )
        policy = (
            MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
            if compute_dtype is not None
            else MixedPrecisionPolicy()
        )
        for stage in wrapped:
            if any(id(p) not in shared_ids for p in stage.parameters()):
                fully_shard(
                    stage,
                    mesh=mesh,
                    reshard_after_forward=mode == "fsdp",
                    mp_policy=policy,
                    ignored_params=shared,
                )
        reduced_after = shared_list
    plan = DataParallelPlan(
        mode=mode,
        precision=precision,
        replicas=replicas,
        overlap=overlap,
        stages=tuple(stages),
        split_stages=tuple(split_stages),
        buckets=tuple(buckets),
        reduced_after=tuple(
            p for p in reduced_after if isinstance(p, torch.nn.Parameter) and p.requires_grad
        ),
    )
    module.__dict__[_PLAN_ATTRIBUTE] = plan
    return plan


def _real_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    # pipetopo names the default group None (torch.distributed's convention); DDP and
    # DeviceMesh want the group object.
    if group is not None:
        return group
    world = dist.group.WORLD
    if not isinstance(world, dist.ProcessGroup):
        raise RuntimeError("torch.distributed's default group is not initialised")
    return world


def _unique(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    unique = []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append(tensor)
    return unique


def _replicate(
    stage: DataParallelStage,
    kept_whole: set[int],
    group: dist.ProcessGroup,
    bucket_cap_mb: float,
) -> torch.nn.Module:
    ignored = [name for name, p in stage.named_parameters() if id(p) in kept_whole]
    if all(id(p) in kept_whole or not p.requires_grad for p in stage.parameters()):
        return stage  # DDP refuses a module with nothing to reduce
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(  # type: ignore[no-untyped-call]
        stage, ignored
    )
    # Replicas build identical buffers; syncing them at every micro-batch's forward would cost
    # a broadcast each. torch 2.13 renamed the switch and warns at the old name.
    no_buffer_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        stage,
        process_group=group,
        gradient_as_bucket_view=True,
        bucket_cap_mb=bucket_cap_mb,
        **no_buffer_sync,
    )
