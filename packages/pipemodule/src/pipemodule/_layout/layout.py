"""The pipeline's layout: every decision that ranks make locally and identically, as one value."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pipemodule._layout.arguments import check_layers, per_stage, resolve_topology
from pipemodule._layout.facts import describe_layers, unique_layers
from pipemodule._layout.fingerprint import ConstructionFingerprint, layer_signature
from pipemodule._layout.placement import StagePlacement
from pipemodule._layout.ties import TieGroup, find_ties, tie_groups
from pipemodule._layout.training_step import TrainingStep
from pipepartition import (
    Parameters,
    PartitionMethod,
    PartitionPlan,
    Profile,
    parse_method,
    plan_partition,
)
from pipespec import Layer, LayerInfo, layer_name
from pipetopo import ProcessTopology

__all__ = [
    "PipelineArguments",
    "PipelineLayout",
    "check_pipeline_arguments",
    "construction_fingerprint",
    "layout_of",
    "plan_pipeline",
    "require_layer_per_stage",
]


@dataclass(frozen=True)
class PipelineLayout:
    """Which stage holds which layers, who shares which tie, and what a stage costs.

    A layout is computed by :func:`plan_pipeline` from the layer list and the topology alone:
    no process group, no device, no communication. Every rank of a job computes the same layout
    (ranks compare its :meth:`fingerprint` before building anything), and ``pipeplan`` shows the
    same value a training job gets. ``PipelineModule.layout`` is the layout it was built from.

    Attributes:
        layers: the checked layer list, in forward order (global layer indices).
        topology: the process topology; each coordinate of its ``pipe`` axis (a *pipe rank*)
            holds ``placement.stages_per_rank`` stages.
        method: the partition method, parsed.
        plan: the partition into ``num_stages`` stages (boundaries, per-layer costs, the
            balanced bottleneck).
        placement: which pipe rank holds which stage.
        ties: every tie key, in sorted order, with its layers, holding stages and owner.
        infos: per-layer descriptions on meta (names, parameter counts, bytes), or None when
            neither the method nor a memory limit needed them (see :meth:`layer_infos`).
    """

    layers: tuple[Layer, ...]
    topology: ProcessTopology
    method: PartitionMethod
    plan: PartitionPlan
    placement: StagePlacement
    ties: Mapping[str, TieGroup]
    infos: tuple[LayerInfo, ...] | None = None

    @property
    def stages_per_rank(self) -> int:
        return self.placement.stages_per_rank

    def stages_of(self, pipe_rank: int) -> tuple[int, ...]:
        """The stages pipe rank ``pipe_rank`` holds, in the order it runs them (ascending)."""
        return self.placement.stages_of(pipe_rank)

    def pipe_rank_of(self, stage: int) -> int:
        """The pipe rank (coordinate on the ``pipe`` axis) that holds ``stage``."""
        return self.placement.pipe_rank_of(stage)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    def layers_of(self, stage: int) -> range:
        """Global indices of the layers ``stage`` runs."""
        return self.plan.layers_of(stage)

    def stage_of(self, layer_index: int) -> int:
        """The stage that runs global layer ``layer_index``."""
        return self.plan.stage_of(layer_index)

    def held_layers(self, stage: int) -> tuple[int, ...]:
        """The layers of ``stage`` that hold a module of their own there.

        A tie key's module and a module object listed twice are held once per stage, by their
        first layer on that stage.
        """
        return tuple(unique_layers(self.layers, self.layers_of(stage)))

    def layer_infos(self) -> tuple[LayerInfo, ...]:
        """Per-layer descriptions: the ones planning made, else described on meta now."""
        return self.infos if self.infos is not None else describe_layers(self.layers)

    def with_layer_infos(self) -> PipelineLayout:
        """This layout with :attr:`infos` filled in (and the plan's parameter column)."""
        infos = self.layer_infos()
        plan = self.plan
        if plan.parameters is None:
            plan = dataclasses.replace(
                plan, parameters=tuple(info.trainable_params for info in infos)
            )
        return dataclasses.replace(self, infos=infos, plan=plan)

    def parameter_count(self, *, trainable_only: bool = False) -> int:
        """Parameters of the whole model, each tie key and each module object counted once."""
        infos = self.layer_infos()
        return sum(
            infos[index].trainable_params if trainable_only else infos[index].num_params
            for index in unique_layers(self.layers)
        )

    def fingerprint(self) -> ConstructionFingerprint:
        """What a rank builds from this layout, in a form ranks can exchange and compare."""
        partition = f"{list(self.plan.boundaries)} placed {self.placement!r}"
        return construction_fingerprint(self.layers, self.topology, partition)

    def table(self) -> str:
        """The partition as a table, one row per stage, with trainable parameter counts."""
        return self.with_layer_infos().plan.table()

    def __repr__(self) -> str:
        placed = (
            ""
            if self.stages_per_rank == 1
            else f", {self.stages_per_rank} per rank ({self.placement.kind})"
        )
        return (
            f"PipelineLayout({self.num_layers} layers in {self.num_stages} stages{placed}, "
            f"boundaries {list(self.plan.boundaries)}, method {self.plan.method}, "
            f"topology {self.topology!r}, ties {list(self.ties)})"
        )


def construction_fingerprint(
    layers: Sequence[Layer], topology: ProcessTopology, partition: str
) -> ConstructionFingerprint:
    """The fingerprint of a construction whose partition is described by ``partition``.

    ``partition`` is the boundaries of a finished layout, or the method while a measured
    partition ('profile') is still to be made.
    """
    return ConstructionFingerprint(
        layers=tuple(layer_signature(layer) for layer in layers),
        topology=repr(topology),
        partition=partition,
    )


def require_layer_per_stage(num_layers: int, plan: PartitionPlan | None, num_stages: int) -> None:
    """Every stage needs at least one layer: too few layers, or boundaries leaving one empty."""
    if num_layers < num_stages:
        layers = "1 layer" if num_layers == 1 else f"{num_layers} layers"
        fix = "use 1 stage" if num_layers == 1 else f"use at most {num_layers} stages"
        raise ValueError(
            f"{layers} cannot fill {num_stages} pipeline stages: every stage needs at least one "
            f"layer; {fix}"
        )
    if plan is None:
        return
    empty = [stage for stage in range(plan.num_stages) if len(plan.layers_of(stage)) == 0]
    if empty:
        raise ValueError(
            f"the partition {list(plan.boundaries)} leaves stage(s) {empty} without layers; every "
            f"stage needs at least one layer: use fewer stages or other boundaries"
        )


@dataclass(frozen=True)
class PipelineArguments:
    """The checked inputs of a layout, before a measured partition ('profile') is known."""

    layers: tuple[Layer, ...]
    topology: ProcessTopology
    method: PartitionMethod
    placement: StagePlacement
    stage_speeds: tuple[float, ...] | None
    stage_memory_limits: tuple[float, ...] | None
    tie_layers: Mapping[str, tuple[int, ...]]
    """Every tie key's layer indices, as :func:`find_ties` checked them."""
    training_step: TrainingStep | None = None
    """The step whose per-stage peak ``stage_memory_limits`` caps; None: parameter bytes."""

    @property
    def needs_profile(self) -> bool:
        """Whether the partition balances measured layer times, which must be measured first."""
        return isinstance(self.method, Profile)

    def fingerprint(self) -> ConstructionFingerprint:
        """What ranks compare before the partition exists: the method instead of boundaries."""
        partition = f"{self.method!r} placed {self.placement!r}"
        return construction_fingerprint(self.layers, self.topology, partition)


def check_pipeline_arguments(
    layers: Iterable[Layer],
    num_stages: int | None = None,
    *,
    topology: ProcessTopology | None = None,
    world_size: int | None = None,
    partition_method: str | PartitionMethod = "parameters",
    stage_speeds: Sequence[float] | None = None,
    stage_memory_limits: Sequence[float] | None = None,
    stages_per_rank: int = 1,
    stage_placement: str = "loop",
    training_step: TrainingStep | None = None,
) -> PipelineArguments:
    """Check everything :func:`plan_pipeline` takes except the measurements; see there."""
    checked = check_layers(layers)
    resolved = resolve_topology(num_stages, topology, world_size)
    placement = StagePlacement.of(stage_placement, resolved.get_dim("pipe"), stages_per_rank)
    stages = placement.num_stages
    require_layer_per_stage(len(checked), None, stages)
    # Occurrences of a key that build different modules, or name no tensor, are refused now.
    tie_layers = find_ties(checked)
    if training_step is not None and not isinstance(training_step, TrainingStep):
        raise TypeError(
            f"training_step={training_step!r} is a {type(training_step).__name__}; pass a "
            f"pipemodule.TrainingStep(sample, schedule, n_microbatches, ...) or None"
        )
    if training_step is not None and stage_memory_limits is None:
        raise ValueError(
            "training_step only tells stage_memory_limits what peak to cap; pass "
            "stage_memory_limits=[bytes per stage] too, or drop training_step (plan_memory "
            "gives the peaks of any layout)"
        )
    return PipelineArguments(
        layers=checked,
        topology=resolved,
        method=parse_method(partition_method),
        placement=placement,
        stage_speeds=per_stage("stage_speeds", stage_speeds, stages),
        stage_memory_limits=per_stage("stage_memory_limits", stage_memory_limits, stages),
        tie_layers=tie_layers,
        training_step=training_step,
    )


def plan_pipeline(
    layers: Iterable[Layer],
    num_stages: int | None = None,
    *,
    topology: ProcessTopology | None = None,
    world_size: int | None = None,
    partition_method: str | PartitionMethod = "parameters",
    stage_speeds: Sequence[float] | None = None,
    stage_memory_limits: Sequence[float] | None = None,
    stages_per_rank: int = 1,
    stage_placement: str = "loop",
    profile: Sequence[float] | None = None,
    describe: bool = False,
    training_step: TrainingStep | None = None,
) -> PipelineLayout:
    """Compute the layout of a pipeline over ``layers``, locally, without communication.

    The arguments mean what they mean for ``PipelineModule``. Give ``num_stages`` (the pipe
    ranks, as in DeepSpeed: pipe x data over ``world_size`` ranks; default ``world_size`` =
    ``num_stages``) or a ``topology``. The list is cut into ``num_stages * stages_per_rank``
    stages, placed on the pipe ranks by ``stage_placement`` ('loop' or 'v').
    Layers are described on the meta device (no memory) only when the method ('parameters'),
    a memory limit or ``describe=True`` needs their parameter counts; 'uniform' and 'type:REGEX'
    layouts construct nothing. ``partition_method='profile'`` needs ``profile``: the measured
    seconds of every layer (``PipelineModule`` measures them on ``profile_input``).

    ``stage_memory_limits`` (bytes, one per stage) cap what a stage holds. Without
    ``training_step`` they cap its parameter bytes only (no gradients, optimizer state or
    activations), as DeepSpeed-style limits do. With ``training_step`` (a
    :class:`TrainingStep`: one micro-batch's input to the first layer, the schedule,
    ``n_microbatches``, the optimizer's states per parameter, checkpointing) they cap each
    stage's training peak as :func:`plan_memory` counts it, and the partition is the fastest
    one within them (with activation checkpointing: one within them, checked exactly; see
    ``_layout/memory_limits.py``). If none fits, ValueError names the stage, how many bytes
    more it needs and what would fit. The loss's own saves are not counted.

    Example::

        >>> from pipemodule import plan_pipeline
        >>> from pipemodule.examples import gpt_layers
        >>> layout = plan_pipeline(gpt_layers(vocab_size=1000, hidden=64, depth=6), num_stages=2)
        >>> layout.layers_of(1), layout.ties["embed"].stages
        (range(4, 9), (0, 1))

    Raises:
        TypeError: a layer, the topology or a number has the wrong type.
        ValueError: a bad method, topology or per-stage list; fewer layers than stages or a
            stage left empty; memory limits that no partition meets; tied occurrences that
            build different modules.
    """
    arguments = check_pipeline_arguments(
        layers,
        num_stages,
        topology=topology,
        world_size=world_size,
        partition_method=partition_method,
        stage_speeds=stage_speeds,
        stage_memory_limits=stage_memory_limits,
        stages_per_rank=stages_per_rank,
        stage_placement=stage_placement,
        training_step=training_step,
    )
    return layout_of(arguments, profile=profile, describe=describe)


def layout_of(
    arguments: PipelineArguments,
    *,
    profile: Sequence[float] | None = None,
    describe: bool = False,
) -> PipelineLayout:
    """The layout of checked ``arguments``; ``profile``: measured seconds per layer."""
    if arguments.needs_profile and profile is None:
        raise ValueError(
            "partition_method='profile' balances measured layer times: pass profile=[seconds of "
            "each layer] (PipelineModule measures them on profile_input)"
        )
    layers, limits = arguments.layers, arguments.stage_memory_limits
    infos = None
    if describe or isinstance(arguments.method, Parameters) or limits is not None:
        infos = describe_layers(layers)
    stages = arguments.placement.num_stages
    names = [layer_name(layer) for layer in layers]

    def partition(
        capacities: Sequence[float] | None, part_sizes: list[list[int]] | None
    ) -> PartitionPlan:
        return plan_partition(
            arguments.method,
            stages,
            names=names,
            parameters=None if infos is None else [info.trainable_params for info in infos],
            profile=profile,
            speeds=arguments.stage_speeds,
            capacities=capacities,
            sizes=None
            if infos is None or capacities is None or part_sizes is not None
            else [info.param_bytes for info in infos],
            part_sizes=part_sizes,
        )

    def assemble(plan: PartitionPlan) -> PipelineLayout:
        require_layer_per_stage(len(layers), plan, stages)
        return PipelineLayout(
            layers=layers,
            topology=arguments.topology,
            method=arguments.method,
            plan=plan,
            placement=arguments.placement,
            ties=tie_groups(
                layers, plan, arguments.topology, arguments.placement, arguments.tie_layers
            ),
            infos=infos,
        )

    if limits is not None and arguments.training_step is not None:
        # Imported here: memory_limits counts activations, whose modules import this one.
        from pipemodule._layout.memory_limits import peak_capped_layout

        return peak_capped_layout(arguments.training_step, limits, partition, assemble)
    return assemble(partition(limits, None))
