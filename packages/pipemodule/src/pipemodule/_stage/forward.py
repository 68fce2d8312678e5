"""Running a stage's layers: the inner loop of every schedule, with optional checkpointing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipemodule._stage.build import ForwardFunc, TiedForward
from pipemodule._stage.seeding import default_seed_fn

if TYPE_CHECKING:
    from pipemodule._module import PipelineModule

__all__ = ["contiguous_outputs", "run_layers"]


def contiguous_outputs(x: Any) -> Any:
    """A stage's outputs as the tensors a send needs: contiguous (a no-op for most)."""
    if isinstance(x, torch.Tensor):
        return x if x.is_contiguous() else x.contiguous()
    if isinstance(x, tuple):
        return tuple(contiguous_outputs(item) for item in x)
    return x


def run_layers(
    owner: PipelineModule, funcs: Sequence[ForwardFunc], first_layer: int, inputs: tuple[Any, ...]
) -> Any:
    """``funcs`` (global layers ``first_layer`` ...) applied to ``inputs``, checkpointed in chunks
    when ``owner`` asks.

    ``owner``'s DeepSpeed attributes (``activation_checkpoint_interval``, ``seed_layers`` ...)
    are read on every call, because DeepSpeed users change them between steps.
    """
    x: Any = inputs[0] if len(inputs) == 1 else tuple(inputs)
    if isinstance(x, tuple) and len(x) == 1:
        x = x[0]
    interval = owner.activation_checkpoint_interval
    if interval == 0 and not owner.seed_layers:
        # The inner loop of every schedule: nothing per layer but the call itself.
        for func in funcs:
            x = func(x)
        owner.curr_layer = first_layer + len(funcs) - 1
        return x
    micro_offset = owner.micro_offset
    if interval == 0:
        return _run_range(owner, funcs, first_layer, 0, len(funcs), micro_offset)(x)
    for start in range(0, len(funcs), interval):
        stop = min(start + interval, len(funcs))
        run = _run_range(owner, funcs, first_layer, start, stop, micro_offset)
        if _is_checkpointable(funcs[start:stop], owner.checkpointable_layers):
            args = x if isinstance(x, tuple) else (x,)
            x = owner.activation_checkpoint_func(_unpacking(run), *args)
        else:
            x = run(x)
    return x


def _run_range(
    owner: PipelineModule,
    funcs: Sequence[ForwardFunc],
    first_layer: int,
    start: int,
    stop: int,
    micro_offset: int,
) -> Callable[[Any], Any]:
    def run(x: Any) -> Any:
        for local_index in range(start, stop):
            # The global index, also inside checkpointed chunks: DeepSpeed uses the index
            # within the chunk there, so every chunk reuses the same seeds.
            owner.curr_layer = first_layer + local_index
            if owner.seed_layers:
                (owner.seed_fn or default_seed_fn)(
                    owner.base_seed * micro_offset + owner.curr_layer
                )
            x = funcs[local_index](x)
        return x

    return run


def _is_checkpointable(funcs: Sequence[ForwardFunc], classes: Sequence[str] | None) -> bool:
    modules = [f.module if isinstance(f, TiedForward) else f for f in funcs]
    if classes is not None:
        return all(type(m).__name__ in classes for m in modules)
    return any(
        isinstance(m, torch.nn.Module) and next(m.parameters(), None) is not None for m in modules
    )


def _unpacking(run: Callable[[Any], Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        return run(args[0] if len(args) == 1 else args)

    return call
