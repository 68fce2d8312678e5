"""PipelineModule's local step: every check and the layout, before the one agreement collective.

Everything here runs on one rank without communicating. `prepare_construction` is the step whose
outcome, a fingerprint or an error, the ranks exchange in `agree_on_construction`, so a mistake
found on one rank only raises on every rank instead of leaving the others waiting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipemodule._layout import (
    ConstructionFingerprint,
    PipelineArguments,
    PipelineLayout,
    check_pipeline_arguments,
    layout_of,
)
from pipemodule._layout.fingerprint import qualified_name
from pipemodule._layout.training_step import TrainingStep
from pipemodule._stage.activation_checkpoint import CheckpointFn
from pipemodule._stage.device import resolve_device
from pipemodule._stage.options import StageOptions, refuse_instances
from pipemodule._stage.seeding import SeedFn
from pipepartition import PartitionMethod
from pipespec import Layer
from pipetopo import ProcessTopology

__all__ = ["Prepared", "check_process_group", "prepare_construction", "seeding_signature"]


def check_process_group(process_group: object) -> int:
    """The size of ``process_group`` (None: the whole job), if this rank is one of its members.

    Checked before anything else: a rank outside the group cannot take part in any collective
    over it, and torch reports its size as -1, which later checks would misreport.
    """
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        if process_group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(
                f"global rank {dist.get_rank()} is not a member of process_group (new_group "
                f"returned its non-member marker on this rank); construct the PipelineModule "
                f"only on the ranks of process_group, or pass process_group=None for all ranks"
            )
        raise TypeError(
            f"process_group={process_group!r} is a {type(process_group).__name__}, not a "
            f"torch.distributed.ProcessGroup; pass one from torch.distributed.new_group, or "
            f"None for the whole job"
        )
    group = process_group if isinstance(process_group, dist.ProcessGroup) else None
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(
            f"global rank {dist.get_rank()} is not a member of process_group (global ranks "
            f"{dist.get_process_group_ranks(group)}); construct the PipelineModule only on "
            f"those ranks, or pass process_group=None for all ranks"
        )
    return dist.get_world_size(group)


def seeding_signature(seed_layers: bool, seed_fn: SeedFn | None, base_seed: int) -> str:
    """What of the seeding arguments changes the weights built (for the fingerprint)."""
    if not seed_layers:
        return "seed_layers=False"
    fn = "default_seed_fn" if seed_fn is None else qualified_name(seed_fn)
    return f"seed_layers=True base_seed={base_seed} seed_fn={fn}"


@dataclass(frozen=True)
class Prepared:
    """The outcome of the local step: checked options, the layout (or its inputs), the device.

    ``layout`` is None when the partition balances measured times ('profile'): those are
    measured after the agreement, on one rank, and the layout is computed from ``arguments``.
    """

    options: StageOptions
    arguments: PipelineArguments
    layout: PipelineLayout | None
    device: torch.device


def prepare_construction(
    layers: Iterable[Layer],
    num_stages: int | None,
    topology: ProcessTopology | None,
    world_size: int,
    *,
    loss_fn: Callable[..., Any] | None,
    seed_layers: bool,
    seed_fn: SeedFn | None,
    base_seed: int,
    partition_method: str | PartitionMethod,
    activation_checkpoint_interval: int,
    activation_checkpoint_func: CheckpointFn,
    checkpointable_layers: Sequence[str] | None,
    device: torch.device | str | int | None,
    stage_speeds: Sequence[float] | None,
    stage_memory_limits: Sequence[float] | None,
    profile_input: Any,
    stages_per_rank: int,
    stage_placement: str,
    refuse: type,
    training_step: TrainingStep | None = None,
) -> tuple[ConstructionFingerprint, Prepared]:
    """Check every argument and compute the layout; no communication, no process group.

    ``refuse`` is the class a layer must not be (a ``PipelineModule`` inside a pipeline).
    """
    options = StageOptions(
        loss_fn=loss_fn,
        seed_layers=seed_layers,
        seed_fn=seed_fn,
        base_seed=base_seed,
        activation_checkpoint_interval=activation_checkpoint_interval,
        activation_checkpoint_func=activation_checkpoint_func,
        checkpointable_layers=StageOptions.layer_classes(checkpointable_layers),
    )
    if isinstance(training_step, TrainingStep):
        training_step = _with_module_checkpointing(
            training_step, activation_checkpoint_interval, checkpointable_layers
        )
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
    refuse_instances(arguments.layers, refuse, "nested pipelines are not supported")
    if arguments.needs_profile and profile_input is None:
        raise ValueError(
            "partition_method='profile' measures each layer on a sample input: pass "
            "profile_input=<a sample batch for the first layer>"
        )
    resolved_device = resolve_device(device)
    # The layout, unless it balances times that must be measured first.
    layout = None if arguments.needs_profile else layout_of(arguments)
    fingerprint = arguments.fingerprint() if layout is None else layout.fingerprint()
    fingerprint = dataclasses.replace(
        fingerprint, seeding=seeding_signature(seed_layers, seed_fn, base_seed)
    )
    return fingerprint, Prepared(options, arguments, layout, resolved_device)


def _with_module_checkpointing(
    step: TrainingStep, interval: int, classes: Sequence[str] | None
) -> TrainingStep:
    """``step`` with the module's own checkpointing, which is what its stages will run."""
    if step.activation_checkpoint_interval not in (0, interval):
        raise ValueError(
            f"training_step has activation_checkpoint_interval="
            f"{step.activation_checkpoint_interval} but the PipelineModule checkpoints every "
            f"{interval} layers; leave it out of TrainingStep (the module's value is used)"
        )
    return dataclasses.replace(
        step,
        activation_checkpoint_interval=interval,
        checkpointable_layers=None if classes is None else tuple(classes),
    )
