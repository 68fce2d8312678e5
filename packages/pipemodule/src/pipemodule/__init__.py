"""Pipeline-parallel PyTorch modules: partition a layer list, build the local stage, tie, train.

A drop-in for ``deepspeed.pipe``: ``from pipemodule import PipelineModule, LayerSpec,
TiedLayerSpec`` replaces ``from deepspeed.pipe import ...``. :func:`plan_pipeline` computes the
same layout a ``PipelineModule`` is built from, without a process group or a device.
"""

from pipemodule.__about__ import __version__
from pipemodule._data_parallel import (
    DATA_PARALLEL_MODES,
    DataParallelPlan,
    data_parallel_of,
    shard_data_parallel,
)
from pipemodule._layout import (
    OPTIMIZER_STATES,
    MemoryPlan,
    PipelineLayout,
    SavedTensorCounter,
    StageMemory,
    TieGroup,
    TrainingStep,
    count_parameters,
    estimate_stage_memory,
    plan_memory,
    plan_pipeline,
)
from pipemodule._layout.byte_sizes import format_bytes
from pipemodule._module import PipelineModule
from pipemodule._resume import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from pipemodule._schedules import SCHEDULES, build_schedule, pipeline_stage, pipeline_stages
from pipemodule._stage.activation_checkpoint import activation_checkpoint
from pipemodule._stage.build import TiedForward
from pipemodule._stage.collective import PipelineRankError
from pipemodule._stage.seeding import default_seed_fn
from pipemodule._stage.stage_module import StageModule
from pipemodule._training import (
    NonFiniteGradientsError,
    PipelineTrainer,
    average_data_parallel_gradients,
    clip_grad_norm_,
    global_grad_norm,
)
from pipespec import LayerSpec, TiedLayerSpec
from pipetopo import (
    PipeDataParallelTopology,
    PipelineParallelGrid,
    PipeModelDataParallelTopology,
    ProcessTopology,
)

__all__ = [
    "DATA_PARALLEL_MODES",
    "OPTIMIZER_STATES",
    "SCHEDULES",
    "CheckpointError",
    "DataParallelPlan",
    "LayerSpec",
    "MemoryPlan",
    "NonFiniteGradientsError",
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineLayout",
    "PipelineModule",
    "PipelineParallelGrid",
    "PipelineRankError",
    "PipelineTrainer",
    "ProcessTopology",
    "SavedTensorCounter",
    "StageMemory",
    "StageModule",
    "TieGroup",
    "TiedForward",
    "TiedLayerSpec",
    "TrainingStep",
    "__version__",
    "activation_checkpoint",
    "average_data_parallel_gradients",
    "build_schedule",
    "clip_grad_norm_",
    "count_parameters",
    "data_parallel_of",
    "default_seed_fn",
    "estimate_stage_memory",
    "format_bytes",
    "global_grad_norm",
    "latest_checkpoint",
    "load_checkpoint",
    "pipeline_stage",
    "pipeline_stages",
    "plan_memory",
    "plan_pipeline",
    "save_checkpoint",
    "shard_data_parallel",
]
