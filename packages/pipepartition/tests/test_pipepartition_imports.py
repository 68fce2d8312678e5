"""pipepartition's promises about what it exports and what it pulls in."""

from __future__ import annotations

import json
import subprocess
import sys

import pipepartition
from pipepartition.__about__ import __version__


def test_importing_pipepartition_imports_neither_torch_nor_numpy_nor_siblings() -> None:
    probe = (
        "import json, sys, pipepartition; "
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in "
        "('torch', 'numpy', 'pipespec', 'pipetopo', 'pipemodule'))))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(completed.stdout) == []


def test_every_exported_name_exists_and_version_comes_from_about() -> None:
    assert set(pipepartition.__all__) == {
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
    }
    for name in pipepartition.__all__:
        assert getattr(pipepartition, name) is not None
    assert pipepartition.__version__ == __version__
