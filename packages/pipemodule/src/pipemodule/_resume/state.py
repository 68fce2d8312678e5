"""What a training checkpoint holds, as one flat torch.distributed.checkpoint state dict.

Keys are global and layout-independent, so any layout reads what it needs:

* ``model.<name>``: every tensor of the module's state dict, by the module's global names
  (``3.up.weight``, ``tied_modules.embed.weight``); copies of a tie and data-parallel replicas
  share a key, and DCP writes each key once;
* ``optim.state.<name>`` and ``optim.param_groups``: the optimizer's state per parameter,
  keyed by the parameter's global name instead of torch's positional index, and each parameter
  group's hyperparameters by group index;
* ``trainer``, ``lr_scheduler``: the step count, the clipping state, the scheduler;
* ``rng.rank_<global rank>``: the RNG states of each rank;
* ``extra.<name>``: the user's extra state.

With a ``model`` axis of more than one rank, slices of one tensor share a name, so the model and
optimizer keys of model rank ``m`` start with ``model_slice_<m>.`` instead.

Non-tensor values are stored as JSON text (see :mod:`.tree`), never as pickles.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipemodule._resume.tree import decode_tree, encode_tree

if TYPE_CHECKING:
    from pipemodule._module import PipelineModule
    from pipemodule._training import PipelineTrainer

__all__ = [
    "EXTRA",
    "GROUPS",
    "SCHEDULER",
    "TRAINER",
    "LoadedState",
    "model_degree",
    "model_key",
    "optimizer_names",
    "optimizer_state_key",
    "put_tree",
    "qualified_name",
    "rng_key",
    "saved_state",
    "slice_prefix",
    "take_tree",
]

GROUPS = "optim.param_groups"
TRAINER = "trainer"
SCHEDULER = "lr_scheduler"
EXTRA = "extra."


def qualified_name(kind: type) -> str:
    """``torch.optim.adam.Adam``: how a checkpoint names the class of an optimizer or scheduler."""
    return f"{kind.__module__}.{kind.__qualname__}"


def model_degree(module: PipelineModule) -> int:
    grid = module.grid
    return grid.axis_size("model") if "model" in grid.axes else 1


def slice_prefix(module: PipelineModule) -> str:
    if model_degree(module) == 1:
        return ""
    return f"model_slice_{module.grid.axis_rank('model'):02d}."


def model_key(module: PipelineModule, name: str) -> str:
    return f"{slice_prefix(module)}model.{name}"


def optimizer_state_key(module: PipelineModule, name: str) -> str:
    return f"{slice_prefix(module)}optim.state.{name}"


def rng_key(global_rank: int) -> str:
    return f"rng.rank_{global_rank:05d}"


def optimizer_names(module: PipelineModule, optimizer: torch.optim.Optimizer) -> list[str]:
    """The global name of each optimizer parameter, in torch's state-dict order.

    Raises ValueError if the optimizer holds a tensor that is not a parameter of the module.
    """
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    ordered = []
    for index, group in enumerate(optimizer.param_groups):
        for parameter in group["params"]:
            name = names.get(id(parameter))
            if name is None:
                raise ValueError(
                    f"the optimizer's parameter group {index} holds a tensor of shape "
                    f"{tuple(parameter.shape)} that is not a parameter of the PipelineModule; "
                    f"build the optimizer from module.parameters()"
                )
            ordered.append(name)
    return ordered


def put_tree(state: dict[str, Any], key: str, value: Any, *, what: str) -> None:
    """Store ``value`` under ``key`` (JSON text) and its tensors under ``key:<path>``."""
    encoded = encode_tree(key, value, what=what)
    state[key] = encoded.text
    state.update(encoded.tensors)


def take_tree(loaded: Mapping[str, Any], key: str) -> Any:
    """The value :func:`put_tree` stored under ``key``, from a loaded state dict."""
    return decode_tree(loaded[key], loaded)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy
    except ImportError:  # numpy is optional
        return state
    kind, keys, position, has_gauss, gauss = numpy.random.get_state(legacy=True)
    state["numpy"] = [str(kind), [int(k) for k in keys], int(position), int(has_gauss), gauss]
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`saved_state` recorded of this rank's RNGs."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        try:
            import numpy
        except ImportError:
            return
        kind, keys, position, has_gauss, gauss = state["numpy"]
        numpy.random.set_state(
            (kind, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, gauss)
        )


def saved_state(trainer: PipelineTrainer, extra_state: Mapping[str, Any]) -> dict[str, Any]:
    """This rank's part of the checkpoint, as a flat DCP state dict (local; no communication)."""
    module, optimizer = trainer.module, trainer.optimizer
    state: dict[str, Any] = {}
    for name, tensor in module.state_dict().items():
        state[model_key(module, name)] = tensor.detach()
    names = optimizer_names(module, optimizer)
    torch_state = optimizer.state_dict()
    for index, parameter_state in torch_state["state"].items():
        name = names[index]
        put_tree(
            state,
            optimizer_state_key(module, name),
            parameter_state,
            what=f"the optimizer state of {name!r}",
        )
    groups = [
        {key: value for key, value in group.items() if key != "params"}
        for group in torch_state["param_groups"]
    ]
    put_tree(state, GROUPS, groups, what="the optimizer's param_groups")
    put_tree(
        state,
        TRAINER,
        {"step_count": trainer.step_count, "last_grad_norm": trainer.last_grad_norm},
        what="the trainer state",
    )
    if trainer.lr_scheduler is not None:
        put_tree(state, SCHEDULER, trainer.lr_scheduler.state_dict(), what="lr_scheduler")
    put_tree(state, rng_key(torch.distributed.get_rank()), _rng_state(module.device), what="RNG")
    for name, value in extra_state.items():
        put_tree(state, f"{EXTRA}{name}", value, what=f"extra state {name!r}")
    return state


@dataclass
class LoadedState:
    """Everything read from a checkpoint, checked and ready to apply; nothing applied yet."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    lr_scheduler: dict[str, Any] | None
    rng: dict[str, Any] | None
    extra: dict[str, Any]

    def apply(self, trainer: PipelineTrainer) -> None:
        """Write the state into the trainer, its module, optimizer and scheduler (local)."""
        module = trainer.module
        module.load_state_dict(self.model, strict=True)
        trainer.optimizer.load_state_dict(self.optimizer)
        if trainer.lr_scheduler is not None and self.lr_scheduler is not None:
            trainer.lr_scheduler.load_state_dict(self.lr_scheduler)
        trainer.step_count = int(self.trainer["step_count"])
        norm = self.trainer["last_grad_norm"]
        trainer.last_grad_norm = None if norm is None else float(norm)
        if self.rng is not None:
            set_rng_state(self.rng, module.device)


def tree_keys(keys: Iterator[str] | list[str], key: str) -> list[str]:
    """``key`` and the keys of its tensors (``key:<path>``) among ``keys``."""
    prefix = f"{key}:"
    return [key, *(name for name in keys if name.startswith(prefix))]
