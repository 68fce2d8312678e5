"""The one name for "anything that can stand in a pipeline's layer list"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import torch

from pipespec._layer_spec import LayerSpec

Layer: TypeAlias = LayerSpec | torch.nn.Module | Callable[..., Any]
"""A layer: a spec to build later, a module built already, or a plain callable without weights."""
