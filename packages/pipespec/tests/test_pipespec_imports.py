"""pipespec's promises about what it exports and what it pulls in."""

from __future__ import annotations

import json
import subprocess
import sys

import pipespec
from pipespec.__about__ import __version__


def test_importing_pipespec_imports_no_sibling_package() -> None:
    probe = (
        "import json, sys, pipespec; "
        "print(json.dumps(sorted(name for name in sys.modules "
        "if name.split('.')[0] in ('pipepartition', 'pipetopo', 'pipemodule'))))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(completed.stdout) == []


def test_every_exported_name_exists_and_version_comes_from_about() -> None:
    assert set(pipespec.__all__) == {
        "Layer",
        "LayerInfo",
        "LayerKind",
        "LayerSpec",
        "TiedLayerSpec",
        "__version__",
        "describe",
        "layer_name",
        "resolve_tied_attr",
    }
    for name in pipespec.__all__:
        assert getattr(pipespec, name) is not None
    assert pipespec.__version__ == __version__
