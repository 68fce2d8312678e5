"""The plan pipeplan reports, made through the public layout API, and its JSON form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipemodule import (
    OPTIMIZER_STATES,
    MemoryPlan,
    PipelineLayout,
    StageMemory,
    TieGroup,
    TrainingStep,
    estimate_stage_memory,
    plan_memory,
    plan_pipeline,
)
from pipemodule._cli.arguments import Options, Target, UsageError
from pipemodule._cli.factory import one_line
from pipepartition import Parameters, PartitionMethod, Uniform
from pipespec import Layer

__all__ = ["ActivationOptions", "Report", "activation_options", "counted", "make_report", "to_json"]


@dataclass(frozen=True)
class ActivationOptions:
    """What the activation columns need: schedule, m, a micro-batch's input, checkpointing."""

    schedule: str
    microbatches: int
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    checkpoint_interval: int = 0
    memory_limit: int | None = None
    """Bytes every stage's peak must stay within (``--memory-limit``), or None."""


def activation_options(options: Options) -> ActivationOptions | None:
    """The activation options of the command line, or None when --schedule is absent."""
    given = {
        "--schedule": options.schedule,
        "--microbatches": options.microbatches,
        "--input-shape": options.input_shape,
    }
    if all(value is None for value in given.values()):
        if options.memory_limit is not None:
            raise UsageError(
                "--memory-limit caps each stage's training peak, which depends on the schedule "
                "and the micro-batch: add --schedule, --microbatches and --input-shape (e.g. "
                "--schedule 1f1b --microbatches 8 --input-shape 4,2048)"
            )
        if options.checkpoint_interval:
            raise UsageError(
                "--checkpoint-interval changes activations only: add --schedule, --microbatches "
                "and --input-shape"
            )
        return None
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise UsageError(
            f"activations need --schedule, --microbatches and --input-shape together; add "
            f"{' and '.join(missing)} (e.g. --schedule 1f1b --microbatches 8 --input-shape 4,2048)"
        )
    dtype = getattr(torch, options.input_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(
            f"--input-dtype {options.input_dtype!r} is not a torch dtype; pass e.g. int64, "
            "float32 or bfloat16"
        )
    schedule, microbatches, shape = options.schedule, options.microbatches, options.input_shape
    if schedule is None or microbatches is None or shape is None:  # told above; for the types
        raise UsageError("activations need --schedule, --microbatches and --input-shape")
    return ActivationOptions(
        schedule, microbatches, shape, dtype, options.checkpoint_interval, options.memory_limit
    )


def counted(number: int, noun: str) -> str:
    """``1 layer``, ``27 layers``: a count and its noun, for the report's sentences."""
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


@dataclass(frozen=True)
class Report:
    """What pipeplan prints: the layout of the factory's layers and each stage's memory.

    ``layout`` holds the layer descriptions and its plan the per-layer parameter counts, so
    nothing below describes a layer again.
    """

    target: Target
    arguments: Mapping[str, object]
    optimizer: str
    layout: PipelineLayout
    stages: tuple[StageMemory, ...]
    memory: MemoryPlan | None = None
    activations: ActivationOptions | None = None

    @property
    def method(self) -> PartitionMethod:
        return self.layout.method

    @property
    def bottleneck_stage(self) -> int:
        plan = self.layout.plan
        return plan.stage_times.index(plan.bottleneck)

    def tie_parameters(self, tie: TieGroup) -> int:
        """Parameters of one copy of the tied module."""
        return self.layout.layer_infos()[tie.first_layer].num_params

    @property
    def model_parameters(self) -> int:
        """Parameters of the whole model: each tie key and each module object once."""
        return self.layout.parameter_count()


def _layout(
    target: Target,
    layers: Sequence[Layer],
    ranks: int,
    method: PartitionMethod,
    stages_per_rank: int,
    placement: str,
) -> PipelineLayout:
    num_stages = ranks * stages_per_rank
    if 0 < len(layers) < num_stages:  # an empty list gets the library's own message
        fewer = max(1, len(layers) // stages_per_rank)
        raise UsageError(
            f"{target} has {counted(len(layers), 'layer')}, too few for {num_stages} stages "
            f"(every stage needs a layer); use --stages {fewer} or fewer"
        )
    placed: dict[str, Any] = {"stages_per_rank": stages_per_rank, "stage_placement": placement}
    # A 'uniform' or 'type:' plan constructs nothing, so it checks the layer list, the ties and
    # the pattern first; an error of the plan that describes the layers is then a layer that
    # cannot be built on meta, which is told with where the user's code failed.
    check = Uniform() if isinstance(method, Parameters) else method
    try:
        plan_pipeline(layers, num_stages=ranks, partition_method=check, **placed)
    except (TypeError, ValueError) as error:
        raise UsageError(f"cannot plan {target}: {error}") from None
    try:
        layout = plan_pipeline(
            layers, num_stages=ranks, partition_method=method, describe=True, **placed
        )
    except Exception as error:
        raise UsageError(
            f"describing the layers of {target} on the meta device failed: {one_line(error)}"
        ) from error
    return layout.with_layer_infos()


def make_report(
    target: Target,
    arguments: Mapping[str, object],
    layers: Sequence[Layer],
    *,
    num_stages: int,
    method: PartitionMethod,
    optimizer: str,
    stages_per_rank: int = 1,
    placement: str = "loop",
    activations: ActivationOptions | None = None,
) -> Report:
    """Plan ``layers`` as PipelineModule would, describing each layer on meta once."""
    layout = _layout(target, layers, num_stages, method, stages_per_rank, placement)
    states = OPTIMIZER_STATES[optimizer]
    if activations is None:
        stages = estimate_stage_memory(layout, optimizer_states=states)
        return Report(target, arguments, optimizer, layout, tuple(stages))
    sample = torch.empty(activations.input_shape, dtype=activations.input_dtype, device="meta")
    if activations.memory_limit is not None:
        layout = _limited_layout(target, layers, layout, method, sample, states, activations)
    try:
        memory = plan_memory(
            layout,
            sample,
            schedule=activations.schedule,
            n_microbatches=activations.microbatches,
            optimizer_states=states,
            activation_checkpoint_interval=activations.checkpoint_interval,
        )
    except (TypeError, ValueError) as error:
        raise UsageError(f"cannot plan the activations of {target}: {error}") from None
    except RuntimeError as error:
        raise UsageError(
            f"running the layers of {target} on the meta device failed: {one_line(error)}"
        ) from error
    return Report(
        target, arguments, optimizer, layout, memory.stages, memory=memory, activations=activations
    )


def _limited_layout(
    target: Target,
    layers: Sequence[Layer],
    unlimited: PipelineLayout,
    method: PartitionMethod,
    sample: torch.Tensor,
    states: int,
    activations: ActivationOptions,
) -> PipelineLayout:
    """The fastest layout whose every stage's peak fits ``--memory-limit``."""
    step = TrainingStep(
        sample,
        activations.schedule,
        activations.microbatches,
        optimizer_states=states,
        activation_checkpoint_interval=activations.checkpoint_interval,
    )
    limit = activations.memory_limit
    if limit is None:  # the caller's condition; for the types
        return unlimited
    try:
        layout = plan_pipeline(
            layers,
            num_stages=unlimited.placement.pipe_ranks,
            partition_method=method,
            stages_per_rank=unlimited.stages_per_rank,
            stage_placement=unlimited.placement.kind,
            stage_memory_limits=[limit] * unlimited.num_stages,
            training_step=step,
            describe=True,
        )
    except (TypeError, ValueError) as error:
        raise UsageError(f"--memory-limit {limit:,} bytes for {target}: {error}") from None
    except RuntimeError as error:
        raise UsageError(
            f"running the layers of {target} on the meta device failed: {one_line(error)}"
        ) from error
    return layout.with_layer_infos()


def _loads(report: Report) -> list[float]:
    plan = report.layout.plan
    bottleneck = plan.bottleneck
    return [time / bottleneck if bottleneck > 0 else 1.0 for time in plan.stage_times]


def _stage_json(
    stage: StageMemory, cost: float, load: float, rank: int, with_activations: bool
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "stage": stage.stage,
        "rank": rank,
        "first_layer": stage.layers.start,
        "last_layer": stage.layers.stop - 1,
        "num_layers": len(stage.layers),
        "names": list(stage.names),
        "parameters": stage.parameters,
        "trainable_parameters": stage.trainable_parameters,
        "parameter_bytes": stage.parameter_bytes,
        "gradient_bytes": stage.gradient_bytes,
        "optimizer_bytes": stage.optimizer_bytes,
        "total_bytes": stage.total_bytes,
        "tied_keys": list(stage.tied_keys),
        "cost": cost,
        "load": load,
    }
    if with_activations:
        record["saved_bytes_per_microbatch"] = stage.saved_bytes_per_microbatch
        record["microbatches_in_flight"] = stage.microbatches_in_flight
        record["recompute_bytes"] = stage.recompute_bytes
        record["activation_bytes"] = stage.activation_bytes
        record["peak_bytes"] = stage.peak_bytes
    return record


def to_json(report: Report) -> dict[str, Any]:
    """The report as plain JSON values; its ``plan`` restores with PartitionPlan.from_dict."""
    plan = report.layout.plan
    costs = zip(report.stages, plan.stage_costs, _loads(report), strict=True)
    return {
        "factory": str(report.target),
        "arguments": dict(report.arguments),
        "num_layers": plan.num_layers,
        "num_stages": plan.num_stages,
        "method": plan.method,
        "optimizer": report.optimizer,
        "optimizer_states_per_parameter": OPTIMIZER_STATES[report.optimizer],
        "model_parameters": report.model_parameters,
        "stages_per_rank": report.layout.stages_per_rank,
        "placement": report.layout.placement.kind,
        "stages": [
            _stage_json(
                stage,
                cost,
                load,
                report.layout.pipe_rank_of(stage.stage),
                report.memory is not None,
            )
            for stage, cost, load in costs
        ],
        "tied": [
            {
                "key": tie.key,
                "parameters": report.tie_parameters(tie),
                "layers": list(tie.layer_indices),
                "stages": list(tie.stages),
            }
            for tie in report.layout.ties.values()
        ],
        "bottleneck": plan.bottleneck,
        "bottleneck_stage": report.bottleneck_stage,
        "imbalance": plan.imbalance,
        "plan": plan.to_dict(),
        **_memory_json(report),
    }


def _memory_json(report: Report) -> dict[str, Any]:
    memory, options = report.memory, report.activations
    if memory is None or options is None:
        return {}
    return {
        "schedule": memory.schedule,
        "n_microbatches": memory.n_microbatches,
        "input_shape": list(options.input_shape),
        "input_dtype": str(options.input_dtype).removeprefix("torch."),
        "activation_checkpoint_interval": memory.activation_checkpoint_interval,
        "memory_limit_bytes": options.memory_limit,
        "rank_peak_bytes": list(memory.rank_peak_bytes),
        "limiting_stage": memory.limiting_stage,
        "limiting_rank": memory.limiting_rank,
    }
