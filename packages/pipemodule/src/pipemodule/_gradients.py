"""Gradients after the schedule: tied copies summed, replicas averaged where no wrapper did.

Which tensors each step touches depends on the data-parallel plan (``_data_parallel.py``): see
its [Note: the data-parallel average is applied once] and [Note: tied parameters under FSDP].
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from pipemodule._data_parallel import data_parallel_of
from pipemodule._module import PipelineModule

__all__ = [
    "average_data_parallel_gradients",
    "local_bytes",
    "reshard_stages",
    "sum_tied_gradients",
]


def sum_tied_gradients(module: PipelineModule) -> None:
    """Sum each tie's gradients over the stages holding a copy; sharded ones shard by shard.

    :meth:`TieLink.sum_gradients` for every link (see [Note: tied parameters under FSDP]).
    Collective over each tie group.
    """
    for link in module.tied_comms.values():
        link.sum_gradients()


def reshard_stages(module: PipelineModule) -> None:
    """Free FSDP's gathered parameters (after a forward-only pass in 'zero2'); local."""
    plan = data_parallel_of(module)
    if plan is None or not plan.shards:
        return
    for stage in plan.stages:
        if isinstance(stage, FSDPModule):
            stage.reshard()


def average_data_parallel_gradients(module: PipelineModule) -> None:
    """Average over the data-parallel replicas what no wrapper averaged (collective, data group).

    Without :func:`shard_data_parallel` that is every gradient: they are flattened into one
    buffer per dtype, so a step costs one all-reduce per dtype rather than one per parameter.
    With it, only the tied parameters remain (their wrappers' average already ran during
    backward, or, under a split backward, was launched per stage and is waited for here); see
    [Note: the data-parallel average is applied once].
    """
    grid = module.grid
    replicas = grid.axis_size("data")
    if replicas == 1:
        return
    plan = data_parallel_of(module)
    if plan is not None:
        plan.sync.finish()  # the buckets a split-backward schedule launched per stage
    parameters = list(module.parameters()) if plan is None else list(plan.reduced_after)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for parameter in parameters:
        if parameter.requires_grad:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            by_dtype.setdefault(parameter.grad.dtype, []).append(parameter.grad)
    for grads in by_dtype.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, group=grid.axis_group("data"))
        flat /= replicas
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def local_bytes(tensor: torch.Tensor) -> int:
    """The bytes ``tensor`` holds on this rank: a DTensor's local shard only."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()
