"""Pipeline-parallel PyTorch modules: partition a layer list, build the local stage, tie, train.

A drop-in for ``deepspeed.pipe``: ``from pipemodule import PipelineModule, LayerSpec,
TiedLayerSpec`` replaces ``from deepspeed.pipe import ...``.
"""

from pipemodule.__about__ import __version__
from pipemodule._activation_checkpoint import activation_checkpoint
from pipemodule._collective import PipelineRankError
from pipemodule._module import PipelineModule, TiedForward
from pipemodule._parameter_count import count_parameters
from pipemodule._seeding import default_seed_fn
from pipemodule._training import (
    SCHEDULES,
    PipelineTrainer,
    average_data_parallel_gradients,
    build_schedule,
    clip_grad_norm_,
    pipeline_stage,
)
from pipespec import LayerSpec, TiedLayerSpec
from pipetopo import (
    PipeDataParallelTopology,
    PipelineParallelGrid,
    PipeModelDataParallelTopology,
    ProcessTopology,
)

__all__ = [
    "SCHEDULES",
    "LayerSpec",
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineModule",
    "PipelineParallelGrid",
    "PipelineRankError",
    "PipelineTrainer",
    "ProcessTopology",
    "TiedForward",
    "TiedLayerSpec",
    "__version__",
    "activation_checkpoint",
    "average_data_parallel_gradients",
    "build_schedule",
    "clip_grad_norm_",
    "count_parameters",
    "default_seed_fn",
    "pipeline_stage",
]
