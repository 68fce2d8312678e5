"""Keeping the copies of a tied module identical: the groups between the stages that hold one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pipemodule._layout import PipelineLayout
from pipespec import resolve_tied_attr
from pipetopo import PipelineParallelGrid

__all__ = ["TieLink", "is_tied_copy", "link_ties", "tied_weights_and_groups"]


@dataclass(frozen=True)
class TieLink:
    """This rank's copy of one tied module and the group of the stages holding the other copies."""

    key: str
    topology_ranks: tuple[int, ...]
    """The holders' ranks in the grid's topology, lowest stage first."""
    ranks: tuple[int, ...]
    """Global ranks holding a copy, lowest stage first; the first one owns the values."""
    group: dist.ProcessGroup | None
    """The group of ``ranks``; None is the default group, as torch.distributed reads it."""
    attrs: tuple[str, ...]
    module: torch.nn.Module

    @property
    def owner(self) -> int:
        """The global rank whose values every copy takes."""
        return self.ranks[0]

    def tensors(self) -> list[torch.Tensor]:
        return [resolve_tied_attr(self.module, attr) for attr in self.attrs]

    def broadcast_from_owner(self) -> None:
        """Copy the owner's values into every other copy (collective over the tie group).

        A sharded copy (a DTensor under FSDP) is copied by its local shard, which covers the
        same slice of the tie on every holder, as in :meth:`sum_gradients`.
        """
        with torch.no_grad():
            for tensor in self.tensors():
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor.data
                dist.broadcast(local, src=self.owner, group=self.group)

    def sum_gradients(self) -> None:
        """Sum the tied tensors' gradients over the copies (collective over the tie group).

        A copy that received no gradient contributes zeros rather than skipping the collective,
        which would leave its peers waiting. A sharded gradient (a DTensor under FSDP) is summed
        by its local shard: every holder's shard covers the same slice of the tie (see
        [Note: tied parameters under FSDP] in ``_data_parallel.py``).
        """
        for tensor in self.tensors():
            if tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
            grad = tensor.grad
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)


def link_ties(
    layout: PipelineLayout,
    grid: PipelineParallelGrid,
    tied_modules: Mapping[str, torch.nn.Module],
) -> dict[str, TieLink]:
    """Create the group of every tie's rank sets; return this rank's links.

    Collective over the grid's group: every rank creates every group, keys in sorted order and
    pipeline replicas in row-major order (the layout's order), so all ranks agree on the order of
    group creation.
    """
    links: dict[str, TieLink] = {}
    for key, tie in layout.ties.items():
        for topology_ranks in tie.rank_sets:
            grid.group_for(topology_ranks)
            if grid.topology_rank in topology_ranks:
                links[key] = TieLink(
                    key=key,
                    topology_ranks=topology_ranks,
                    ranks=tuple(grid.to_global_rank(rank) for rank in topology_ranks),
                    group=grid.group_of(topology_ranks),
                    attrs=tie.attrs,
                    module=tied_modules[key],
                )
    return links


def tied_weights_and_groups(
    links: Iterable[TieLink], grid: PipelineParallelGrid
) -> list[tuple[torch.Tensor, dist.ProcessGroup]]:
    """``(tensor, group)`` for each tied tensor of ``links``, the group as a real ProcessGroup."""
    pairs = []
    for link in links:
        # Created at construction, so this is a cache look-up on this rank alone.
        group = grid.group_for(link.topology_ranks)
        if group is None:
            raise RuntimeError(f"this rank is not in the group of tie {link.key!r}")
        pairs += [(tensor, group) for tensor in link.tensors()]
    return pairs


def is_tied_copy(links: Iterable[TieLink], parameter: torch.Tensor, global_rank: int) -> bool:
    """Whether ``parameter`` is one of ``links``' tensors and another rank owns its values."""
    return any(
        link.owner != global_rank and any(parameter is tensor for tensor in link.tensors())
        for link in links
    )
