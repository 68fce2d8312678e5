"""Split a list of layers into contiguous pipeline stages: optimal, constrained, pure Python.

Importing this package never imports torch or numpy.
"""

from pipepartition.__about__ import __version__
from pipepartition._balanced import partition_balanced
from pipepartition._capacity_error import CapacityError
from pipepartition._methods import (
    Boundaries,
    Parameters,
    PartitionMethod,
    Profile,
    TypeRegex,
    Uniform,
    Weights,
    parse_method,
)
from pipepartition._plan import PartitionPlan
from pipepartition._planner import plan_partition
from pipepartition._uniform import partition_uniform

__all__ = [
    "Boundaries",
    "CapacityError",
    "Parameters",
    "PartitionMethod",
    "PartitionPlan",
    "Profile",
    "TypeRegex",
    "Uniform",
    "Weights",
    "__version__",
    "parse_method",
    "partition_balanced",
    "partition_uniform",
    "plan_partition",
]
