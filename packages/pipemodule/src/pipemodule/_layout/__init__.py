"""The pipeline's layout: decided locally, the same on every rank; never communicates.

Everything a rank decides before talking to another rank lives here, as one frozen value
(:class:`PipelineLayout`), so that ``PipelineModule``, ``pipeplan`` and a user's notebook
compute exactly the same plan. Nothing in this package imports ``torch.distributed``.
"""

from pipemodule._layout.activations import SavedTensorCounter, StageActivations, stage_activations
from pipemodule._layout.arguments import check_layers
from pipemodule._layout.facts import count_parameters, describe_layers, unique_layers
from pipemodule._layout.fingerprint import ConstructionFingerprint, first_difference
from pipemodule._layout.inflight import Action, ScheduleOrder, schedule_order
from pipemodule._layout.layout import (
    PipelineArguments,
    PipelineLayout,
    check_pipeline_arguments,
    construction_fingerprint,
    layout_of,
    plan_pipeline,
    require_layer_per_stage,
)
from pipemodule._layout.memory import (
    OPTIMIZER_STATES,
    MemoryPlan,
    StageMemory,
    estimate_stage_memory,
    plan_memory,
)
from pipemodule._layout.placement import PLACEMENTS, StagePlacement
from pipemodule._layout.ties import TieGroup, find_ties
from pipemodule._layout.training_step import TrainingStep

__all__ = [
    "OPTIMIZER_STATES",
    "PLACEMENTS",
    "Action",
    "ConstructionFingerprint",
    "MemoryPlan",
    "PipelineArguments",
    "PipelineLayout",
    "SavedTensorCounter",
    "ScheduleOrder",
    "StageActivations",
    "StageMemory",
    "StagePlacement",
    "TieGroup",
    "TrainingStep",
    "check_layers",
    "check_pipeline_arguments",
    "construction_fingerprint",
    "count_parameters",
    "describe_layers",
    "estimate_stage_memory",
    "find_ties",
    "first_difference",
    "layout_of",
    "plan_memory",
    "plan_pipeline",
    "require_layer_per_stage",
    "schedule_order",
    "stage_activations",
    "unique_layers",
]
