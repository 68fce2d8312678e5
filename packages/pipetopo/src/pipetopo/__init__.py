"""Process topologies (pipe x data x model) and their torch.distributed communication grid."""

from pipetopo.__about__ import __version__
from pipetopo._checks import WrongTypeError
from pipetopo._coord import ProcessCoord
from pipetopo._grid import PipelineParallelGrid
from pipetopo._groups import default_if_none, none_if_default
from pipetopo._topology import (
    PipeDataParallelTopology,
    PipeModelDataParallelTopology,
    ProcessTopology,
    default_topology,
)

__all__ = [
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineParallelGrid",
    "ProcessCoord",
    "ProcessTopology",
    "WrongTypeError",
    "__version__",
    "default_if_none",
    "default_topology",
    "none_if_default",
]
