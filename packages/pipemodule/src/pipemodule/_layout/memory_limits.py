"""Memory limits that cap each stage's training peak: the fastest partition that fits.

A stage's peak is its parameters, gradients and optimizer state plus the activations it saves
per micro-batch times the micro-batches it holds at once (``memory.py``). The first part is a
sum over the stage's layers; so is the second, per micro-batch (``layer_activations.py``),
and the multiplier depends only on the schedule, the pipe ranks, the stages per rank and m,
never on the partition (``inflight.py``). So layer ``i`` weighs ``fixed[i] + in_flight[s] *
saved[i]`` on stage ``s``, and pipepartition's ``part_sizes`` finds the fastest partition
within the limits, exactly for that model.

The model errs on the safe side (see ``layer_activations.py``); every chosen partition is then
checked with the exact per-stage count (:func:`plan_memory`). Activation checkpointing is not
additive per layer: when the exact count of a stage exceeds its limit, that stage's limit for
the search is lowered by the excess and the search runs again, a few times at most; if it
still does not fit, ValueError. With checkpointing the partition therefore fits but may not
be the fastest one that does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipemodule._layout.byte_sizes import show_bytes
from pipemodule._layout.inflight import schedule_order
from pipemodule._layout.layer_activations import layer_saved_bytes
from pipemodule._layout.layout import PipelineLayout
from pipemodule._layout.memory import plan_memory
from pipemodule._layout.training_step import TrainingStep
from pipepartition import CapacityError, PartitionPlan
from pipespec import LayerInfo

__all__ = ["peak_capped_layout"]

_ROUNDS = 8
"""Searches at most, when the exact count finds a stage over its limit (checkpointing)."""

Partition = Callable[[Sequence[float] | None, list[list[int]] | None], PartitionPlan]
"""``partition(capacities, part_sizes)``: the layout's partition method under those caps."""


def _fixed_bytes(info: LayerInfo, optimizer_states: int) -> int:
    # Gradients and optimizer state are the size of the trainable parameters (memory.py's
    # rule: bytes in proportion to element counts, exact when a layer has one dtype).
    trainable = (
        0 if info.num_params == 0 else info.param_bytes * info.trainable_params // info.num_params
    )
    return info.param_bytes + (1 + optimizer_states) * trainable


def peak_capped_layout(
    step: TrainingStep,
    limits: Sequence[float],
    partition: Partition,
    assemble: Callable[[PartitionPlan], PipelineLayout],
) -> PipelineLayout:
    """The layout whose every stage's peak for ``step`` is within ``limits``; the fastest
    such partition without checkpointing (see the module note).

    Raises:
        ValueError: no partition fits: which stage needs how many bytes more, and what would fit.
    """
    provisional = assemble(partition(None, None)).with_layer_infos()
    fixed = [_fixed_bytes(info, step.optimizer_states) for info in provisional.layer_infos()]
    saved = layer_saved_bytes(
        provisional,
        step.sample,
        activation_checkpoint_interval=step.activation_checkpoint_interval,
        checkpointable_layers=step.checkpointable_layers,
    )
    placement = provisional.placement
    order = schedule_order(
        step.schedule, placement.pipe_ranks, step.n_microbatches, placement.stages_per_rank
    )
    in_flight = order.in_flight()

    def sizes(multipliers: Sequence[int]) -> list[list[int]]:
        return [[f + m * a for f, a in zip(fixed, saved, strict=True)] for m in multipliers]

    caps = list(limits)
    for _ in range(_ROUNDS):
        try:
            plan = partition(caps, sizes(in_flight))
        except CapacityError as error:
            raise ValueError(
                _no_fit(step, limits, caps, error, order.schedule, partition, sizes, provisional)
            ) from error
        layout = assemble(plan)
        memory = plan_memory(
            layout,
            step.sample,
            schedule=step.schedule,
            n_microbatches=step.n_microbatches,
            optimizer_states=step.optimizer_states,
            activation_checkpoint_interval=step.activation_checkpoint_interval,
            checkpointable_layers=step.checkpointable_layers,
        )
        over = [
            (stage.stage, stage.peak_bytes - limits[stage.stage])
            for stage in memory.stages
            if stage.peak_bytes > limits[stage.stage]
        ]
        if not over:
            return layout
        for stage, excess in over:
            caps[stage] -= excess
            if caps[stage] <= 0:
                break
        else:
            continue
        break
    stage, excess = over[0]
    raise ValueError(
        f"no partition found whose training peak ({_describe(step, order.schedule)}) fits "
        f"stage_memory_limits: the last tried, boundaries {list(layout.plan.boundaries)}, "
        f"needs {show_bytes(excess)} more on stage {stage} by the exact count (activation "
        f"checkpointing keeps what a chunk's start saves, which a per-layer search can only "
        f"approximate); what would fit: {_fixes(step, excess)}"
    )


def _describe(step: TrainingStep, schedule: str) -> str:
    ckpt = (
        f", activation checkpointing every {step.activation_checkpoint_interval} layers"
        if step.activation_checkpoint_interval
        else ""
    )
    return (
        f"schedule {schedule!r}, {step.n_microbatches} micro-batches, "
        f"{step.optimizer_states} optimizer states per parameter{ckpt}"
    )


def _fixes(step: TrainingStep, raise_by: float, other_schedule: str = "") -> str:
    fixes = [f"every limit raised by {show_bytes(raise_by)} (the least that fits)", "more stages"]
    if step.activation_checkpoint_interval == 0:
        fixes.append("activation checkpointing (activation_checkpoint_interval=1)")
    fixes.append(other_schedule or "fewer micro-batches in flight (a smaller n_microbatches)")
    return ", ".join(fixes[:-1]) + " or " + fixes[-1]


def _no_fit(
    step: TrainingStep,
    limits: Sequence[float],
    caps: Sequence[float],
    error: CapacityError,
    schedule: str,
    partition: Partition,
    sizes: Callable[[Sequence[int]], list[list[int]]],
    provisional: PipelineLayout,
) -> str:
    stage = error.part
    # The shortfall is against the caps searched with; they are below the limits only after
    # an exact count lowered them (checkpointing).
    needs = error.shortfall + (limits[stage] - caps[stage])
    boundaries = list(error.boundaries)
    other = ""
    if schedule == "GPipe":
        placement = provisional.placement
        one_f_one_b = schedule_order(
            "1f1b", placement.pipe_ranks, step.n_microbatches, placement.stages_per_rank
        ).in_flight()
        try:
            partition(caps, sizes(one_f_one_b))
            verdict = "which fits these limits"
        except CapacityError:
            verdict = "which alone does not fit"
        other = (
            f"fewer micro-batches in flight: 1F1B holds {list(one_f_one_b)} instead of GPipe's "
            f"{step.n_microbatches} per stage ({verdict})"
        )
    shown = (
        f"of {show_bytes(limits[0])} per stage"
        if len(set(limits)) == 1
        else f"{[show_bytes(limit) for limit in limits]}"
    )
    return (
        f"stage_memory_limits {shown} cannot hold every "
        f"stage's training peak ({_describe(step, schedule)}): no partition of the "
        f"{provisional.num_layers} layers into {provisional.num_stages} stages fits; the "
        f"closest, boundaries {boundaries}, needs {show_bytes(needs)} more on stage {stage} "
        f"than its limit {show_bytes(limits[stage])}; what would fit: "
        f"{_fixes(step, needs, other)}"
    )
