"""torch.distributed.pipelining schedules over a PipelineModule's stages, checked before use.

Schedules are torch's own, found by torch's names through ``get_schedule_class``. What is
checked here, on every rank and before any communication, is what torch would only find later
or not at all: that the module's stages per rank and placement fit the schedule, and that the
micro-batch count meets the schedule's rule.

[Note: gradients are scaled once, by the loss]
torch's schedules divide gradients by the number of micro-batches (``scale_grads=True``) when a
stage finishes its last backward. A weight used by two stages of one rank (a tie under 'v'
placement) is then divided twice, at two different times, and ends at about 0.31x its gradient
under ZBVZeroBubble. So schedules are built with ``scale_grads=False`` and the loss of each
micro-batch is divided by the micro-batch count instead: one scaling, whatever holds the weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    get_schedule_class,
)

from pipemodule._checks import positive_int
from pipemodule._data_parallel import GradientSync, ReplicaBuckets, stage_modules_for
from pipemodule._layout.shapes import StageShapes, describe_values, meta_sample, stage_shapes
from pipemodule._module import PipelineModule

__all__ = [
    "SCHEDULES",
    "SPLIT_BACKWARD",
    "build_schedule",
    "pipeline_stage",
    "pipeline_stages",
    "schedule_class",
]

Schedule = PipelineScheduleSingle | PipelineScheduleMulti
"""A torch pipeline schedule: one stage per rank, or several."""

SCHEDULES: dict[str, type[Schedule]] = {
    name.lower(): get_schedule_class(name)
    for name in (
        "GPipe",
        "1F1B",
        "Interleaved1F1B",
        "LoopedBFS",
        "InterleavedZeroBubble",
        "ZBVZeroBubble",
        "DualPipeV",
    )
}
"""torch's schedules by lower-case name; any case is accepted (torch's ``get_schedule_class``)."""

_V_SCHEDULES = (ScheduleZBVZeroBubble, ScheduleDualPipeV)
SPLIT_BACKWARD = (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV)
"""Schedules that run a stage's backward as separate input and weight passes."""
_ROUND_SCHEDULES = (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)


def schedule_class(schedule: object) -> type[Schedule]:
    """torch's schedule class for a name such as ``'1f1b'`` or ``'ZBVZeroBubble'``."""
    if not isinstance(schedule, str):
        raise TypeError(
            f"schedule={schedule!r} is a {type(schedule).__name__}; pass a schedule name, one of "
            f"{[cls.__name__.removeprefix('Schedule') for cls in SCHEDULES.values()]}"
        )
    try:
        found: type[Schedule] | None = get_schedule_class(schedule)
    except ValueError:
        found = None
    # torch's map also names the two abstract bases, which cannot run.
    if found is None or found in (PipelineScheduleSingle, PipelineScheduleMulti):
        raise ValueError(
            f"schedule={schedule!r} is not known; use one of "
            f"{[cls.__name__.removeprefix('Schedule') for cls in SCHEDULES.values()]} (any case)"
        )
    return found


def check_schedule(module: PipelineModule, cls: type[Schedule], n_microbatches: int) -> None:
    """Raise unless ``module``'s placement and ``n_microbatches`` fit schedule ``cls``."""
    name = cls.__name__.removeprefix("Schedule")
    placement = module.layout.placement
    per_rank, kind, ranks = placement.stages_per_rank, placement.kind, placement.pipe_ranks
    built = f"the module holds {per_rank} stage(s) per rank, placed '{kind}'"
    if issubclass(cls, PipelineScheduleSingle) and per_rank != 1:
        raise ValueError(
            f"schedule {name!r} runs one stage per rank, but {built}; build it with "
            f"stages_per_rank=1, or use a multi-stage schedule (Interleaved1F1B, LoopedBFS, "
            f"InterleavedZeroBubble; ZBVZeroBubble or DualPipeV with stage_placement='v')"
        )
    if issubclass(cls, _V_SCHEDULES) and (kind != "v" or per_rank != 2):
        raise ValueError(
            f"schedule {name!r} needs stages_per_rank=2 and stage_placement='v' (rank r holds "
            f"stages r and 2P-1-r), but {built}; build the module with those"
        )
    if issubclass(cls, PipelineScheduleMulti) and not issubclass(cls, _V_SCHEDULES) and kind == "v":
        raise ValueError(
            f"schedule {name!r} runs stages placed 'loop' (rank r holds r, r+P, ...), but {built}; "
            f"build the module with stage_placement='loop', or use ZBVZeroBubble or DualPipeV"
        )
    stages = placement.num_stages
    if cls is Schedule1F1B and n_microbatches < stages:
        raise ValueError(
            f"the 1F1B schedule needs at least as many micro-batches as stages: "
            f"n_microbatches={n_microbatches} < {stages} stages; raise n_microbatches "
            f"or use schedule='gpipe'"
        )
    if cls is ScheduleDualPipeV and n_microbatches < stages:
        raise ValueError(
            f"schedule 'DualPipeV' needs at least as many micro-batches as stages: "
            f"n_microbatches={n_microbatches} < {stages} stages ({ranks} ranks x 2); raise "
            f"n_microbatches to {stages} or more"
        )
    if issubclass(cls, _ROUND_SCHEDULES):
        rounds = max(1, n_microbatches // ranks)
        if n_microbatches % rounds != 0:
            fits = [m for m in range(1, 4 * ranks + 1) if m % max(1, m // ranks) == 0]
            raise ValueError(
                f"schedule {name!r} runs micro-batches in rounds of the {ranks} pipe ranks: "
                f"n_microbatches={n_microbatches} must be a multiple of max(1, "
                f"n_microbatches // {ranks}) = {rounds}; use e.g. one of {fits[-8:]} or a "
                f"multiple of {ranks}"
            )


class _ReducingStage(PipelineStage):
    """torch's stage, reducing over data-parallel replicas as the module's plan says.

    Three additions to torch's own DDP/FSDP handling: FSDP stages unshard before the input and
    weight passes ([Note: FSDP and the split backward]); no reduction while accumulating
    ([Note: one reduction per accumulation window]); and 'replicate' under a split backward
    launches the stage's buckets at REDUCE_GRAD, after its last weight pass.
    """

    def __init__(
        self,
        *args: Any,
        buckets: ReplicaBuckets | None,
        sync: GradientSync | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._buckets = buckets
        self._sync = sync

    def _reduces(self) -> bool:
        return self._sync is None or self._sync.enabled

    def backward_maybe_with_nosync(
        self, backward_type: str, bwd_kwargs: dict[str, Any], last_backward: bool = False
    ) -> Any:
        if backward_type != "full" and isinstance(self.submod, FSDPModule):
            self.submod.unshard()
        return super().backward_maybe_with_nosync(
            backward_type, bwd_kwargs, last_backward=last_backward and self._reduces()
        )

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        if not self._reduces():
            if isinstance(self.submod, FSDPModule):
                self.submod.reshard()  # what FSDP's reduction would free, without reducing
            return
        super().perform_reduce_grad(grad_scale_factor)
        if self._buckets is not None and self._sync is not None:
            self._buckets.launch()
            self._sync.pending.append(self._buckets)


def pipeline_stages(
    module: PipelineModule,
    shapes: Sequence[StageShapes] | None = None,
    *,
    split_backward: bool = False,
) -> list[PipelineStage]:
    """This rank's stages as ``torch.distributed.pipelining.PipelineStage`` objects, in order.

    The stages talk to their neighbours over the grid's pipe group, so data-parallel replicas
    of the pipeline run their schedules independently. With ``shapes`` (every stage's, from
    ``stage_shapes``) the stages get static metadata: torch infers nothing at run time. After
    ``shard_data_parallel`` each stage runs its DDP or FSDP wrapper, which torch's stage drives;
    ``split_backward=True`` (a schedule of :data:`SPLIT_BACKWARD`) replaces DDP by per-stage
    buckets launched after each stage's last weight pass.
    """
    by_stage = {entry.stage: entry for entry in shapes or ()}
    return [
        _ReducingStage(
            reduction.module,
            stage_index=index,
            num_stages=module.layout.num_stages,
            device=module.device,
            input_args=by_stage[index].inputs if index in by_stage else None,
            output_args=by_stage[index].outputs if index in by_stage else None,
            group=module.grid.axis_group("pipe"),
            buckets=reduction.buckets,
            sync=reduction.sync,
        )
        for index, reduction in zip(
            module.stage_ids, stage_modules_for(module, split_backward), strict=True
        )
    ]


def pipeline_stage(
    module: PipelineModule, shapes: Sequence[StageShapes] | None = None
) -> PipelineStage:
    """This rank's only stage as a ``PipelineStage`` (one stage per rank)."""
    stages = pipeline_stages(module, shapes)
    if len(stages) != 1:
        raise ValueError(
            f"this rank holds stages {list(module.stage_ids)}; use pipeline_stages(module)"
        )
    return stages[0]


def _scaled(loss_fn: Callable[[Any, Any], torch.Tensor], n_microbatches: int) -> Callable[..., Any]:
    # See [Note: gradients are scaled once, by the loss].
    def scaled(outputs: Any, target: Any) -> torch.Tensor:
        return loss_fn(outputs, target) / n_microbatches

    return scaled


def build_schedule(
    module: PipelineModule,
    n_microbatches: int,
    schedule: str = "1f1b",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    sample: Any = None,
    shapes: Sequence[StageShapes] | None = None,
) -> Schedule:
    """torch's schedule ``schedule`` (any of :data:`SCHEDULES`, any case) over the module's stages.

    ``loss_fn(outputs, labels)`` defaults to the module's ``loss_fn``; it must return the mean
    loss of a micro-batch. Gradients are the mean over micro-batches, as with torch's default;
    the losses the schedule reports are each divided by ``n_microbatches``, so their sum is
    the mean loss (see [Note: gradients are scaled once, by the loss]). ``sample``, one
    micro-batch's input to the first layer (only its shapes and dtypes matter), gives every stage
    static metadata computed on meta; without it torch infers shapes at the first step.
    ``shapes`` passes metadata already computed by ``stage_shapes``.

    Raises:
        TypeError: ``schedule`` is not a string.
        ValueError: an unknown schedule, a placement or stage count the schedule cannot run, a
            micro-batch count it refuses, or no loss (before any communication).
    """
    cls = schedule_class(schedule)
    positive_int("n_microbatches", n_microbatches)
    check_schedule(module, cls, n_microbatches)
    loss = loss_fn if loss_fn is not None else module.loss_fn
    if loss is None:
        raise ValueError(
            "training needs a loss: pass loss_fn to PipelineModule or to build_schedule"
        )
    scaled = _scaled(loss, n_microbatches)
    # torch types its constructors per class; a single-stage one takes a stage, others a list.
    make: Callable[..., Schedule] = cls
    single = issubclass(cls, PipelineScheduleSingle)
    if shapes is None and sample is not None:
        shapes = stage_shapes(module.layout, sample)
    stages: Any = (
        pipeline_stage(module, shapes)
        if single
        else pipeline_stages(module, shapes, split_backward=issubclass(cls, SPLIT_BACKWARD))
    )
    return make(stages, n_microbatches=n_microbatches, loss_fn=scaled, scale_grads=False)


def check_loss_on_meta(
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    shapes: Sequence[StageShapes],
    labels: Any,
) -> None:
    """Raise unless ``loss_fn`` returns a scalar for the last stage's outputs, on meta.

    A loss function that does not run on meta (it reads values) is not checked here.
    """
    if loss_fn is None:
        return
    outputs = shapes[-1].outputs
    with torch.device("meta"):
        try:
            loss = loss_fn(outputs[0] if len(outputs) == 1 else outputs, meta_sample(labels))
        except Exception:  # values needed: the real step will tell
            return
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn returned {shape} for outputs {describe_values(outputs)} and labels "
            f"{describe_values(meta_sample(labels))}; it must return a scalar tensor: the mean "
            f"loss of one micro-batch (e.g. reduce with .mean())"
        )
