"""Creating and caching the torch.distributed groups of one grid.

[Note: one creation order]
torch names a new group after how many groups were created before it, and ranks meet on those
names; backends then connect the members. So every rank of the grid's group must issue the same
group-creating calls in the same order, members or not: then names agree and no two ranks can
wait for each other inside different groups. The cache below is filled identically on every rank
(non-members record ``None``), so a cache hit skips the call on every rank at once.

Two exceptions keep this cheap:
* a rank set equal to the whole grid reuses the grid's own group;
* a single-rank group is created by its only member with local synchronisation (a hashed name,
  no global counter), so no rank has to call into the W single-rank groups of the others.
  Under eager NCCL (a device bound to the default group) that shortcut would block in
  ``ncclCommSplit``, so there every set, single ranks included, goes through ``split_group``.

[Note: the default group is never kept]
``destroy_process_group()`` frees the default group's backend only if nothing else still
references its ``ProcessGroup``; one that survives until interpreter shutdown is torn down
there, and with gloo (torch 2.13) that aborts the process ("terminate called without an active
exception") in about one exit of four, after a script that did everything right. Objects that
outlive a training script (grids, pipeline modules, tie groups, pipeline stages) therefore keep
None in its place, which every torch.distributed call reads as the default group, and look the
group up when they use it.

The grid applies the rule in one place, so its users need not: `GroupCache` stores every group
in that kept form, and the grid's core accessors for groups that code will keep
(``axis_group``, ``replica_group``, ``group_of``) hand the kept form out unchanged, torch's own
convention (``group=None`` is the default group). Only the DeepSpeed and Megatron spellings,
`group_for`, ``process_group`` and ``to_device_mesh``, whose callers expect a real
``ProcessGroup``, turn it back with `default_if_none` at the moment they are read.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipetopo._checks import WrongTypeError

logger = logging.getLogger(__name__)


def default_group_bound_to_device() -> bool:
    """Whether the default group was initialised eagerly on a device (``device_id=...``)."""
    return getattr(dist.group.WORLD, "bound_device_id", None) is not None


def none_if_default(group: ProcessGroup) -> ProcessGroup | None:
    """``group`` as a long-lived object keeps it: None for the default group.

    See [Note: the default group is never kept]; `default_if_none` turns it back.
    """
    return None if group is dist.group.WORLD else group


def default_if_none(group: ProcessGroup | None) -> ProcessGroup:
    """The group that `none_if_default` kept as ``group``."""
    if group is not None:
        return group
    world = dist.group.WORLD
    if not isinstance(world, ProcessGroup):
        raise RuntimeError(
            "the default process group is gone (destroy_process_group() was called); "
            "use a pipeline grid only between init_process_group() and destroy_process_group()."
        )
    return world


def grid_process_group(
    process_group: ProcessGroup | None,
) -> tuple[ProcessGroup, int, int, tuple[int, ...] | None]:
    """The group a grid lives in, checked: ``(group, rank in it, size, global ranks)``.

    The global ranks are those of each group rank, or None when they are equal (the group is
    the default group, or spans it in order). Nothing here communicates.

    Raises:
        RuntimeError: torch.distributed is not initialised, this rank is not in the group, or
            this torch cannot create groups inside a sub-group of a device-bound default group.
        WrongTypeError: ``process_group`` is neither a ProcessGroup nor None.
        ValueError: the group lists its global ranks out of order.
    """
    given: object = process_group
    if given is not None and not isinstance(given, ProcessGroup):
        if given == dist.GroupMember.NON_GROUP_MEMBER:
            raise RuntimeError(
                f"global rank {dist.get_rank()} is not a member of process_group (new_group "
                "returned its non-member marker here); construct the grid only on the ranks "
                "of process_group."
            )
        raise WrongTypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None, got {given!r}; "
            "pass a group from torch.distributed.new_group, or None for the whole job."
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "PipelineParallelGrid needs an initialised torch.distributed; call "
            "torch.distributed.init_process_group(...) on every rank first."
        )
    group = dist.group.WORLD if process_group is None else process_group
    if not isinstance(group, ProcessGroup):
        raise RuntimeError(
            "torch.distributed has no default process group; call "
            "torch.distributed.init_process_group(...) before building a grid."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            f"global rank {dist.get_rank()} is not a member of process_group (global ranks "
            f"{dist.get_process_group_ranks(group)}); construct the grid only on its ranks."
        )
    size = dist.get_world_size(group)
    if size != dist.get_world_size() and default_group_bound_to_device() and not uses_split_group():
        raise RuntimeError(
            "this torch cannot create groups inside a sub-group when the default group is "
            "bound to a device (init_process_group(device_id=...)): members would block "
            "splitting the default group's communicator. Build the grid on the default "
            "group, or initialise without device_id."
        )
    return group, rank, size, _global_ranks_of(group, size)


def _global_ranks_of(group: ProcessGroup, size: int) -> tuple[int, ...] | None:
    """Global rank of each group rank; None when they are equal (the default group)."""
    if group is dist.group.WORLD:
        return None
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks == tuple(range(size)):
        return None
    if list(ranks) != sorted(ranks):
        raise ValueError(
            f"process_group lists its global ranks out of order ({list(ranks)}); the "
            "groups of a grid order ranks by global rank, so create process_group with "
            "sorted ranks (torch.distributed.new_group's default)."
        )
    return ranks


def uses_split_group() -> bool:
    """Whether groups are carved with ``split_group`` (eagerly initialised NCCL-like backends).

    With a device bound to the default group, torch creates communicators by splitting the
    parent's; ``split_group`` does that for a whole family of groups in one collective over the
    parent (as ``DeviceMesh`` does), where ``new_group`` would split once per group.
    """
    return default_group_bound_to_device() and hasattr(dist, "split_group")


class SharedGroups:
    """The groups every grid of this process created, by global ranks, with a count of users.

    [Note: groups are shared between grids]
    Each group costs its backend connections, file descriptors and threads until it is
    destroyed, so a job that constructs one pipeline after another (a sweep, a test suite)
    would otherwise grow by every grid's groups. Grids therefore take the group of a set of
    global ranks from here and create it only when no live grid holds it. Every rank sees the
    same constructions and closes in the same order (both are collective), so every rank's
    registry holds the same sets, and a hit skips the creating call on every rank at once, as
    [Note: one creation order] needs. Non-members record None, so they count users too.
    The registry belongs to one default group: a new ``init_process_group`` starts it afresh.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, ...], ProcessGroup | None] = {}
        self._users: dict[tuple[int, ...], int] = {}

    def get(self, ranks: tuple[int, ...]) -> tuple[bool, ProcessGroup | None]:
        """``(found, group)`` for a set of global ranks."""
        return (ranks in self._groups, self._groups.get(ranks))

    def acquire(self, ranks: tuple[int, ...], group: ProcessGroup | None) -> None:
        """Count one more user of the group of ``ranks`` (recorded now if new)."""
        self._groups.setdefault(ranks, group)
        self._users[ranks] = self._users.get(ranks, 0) + 1

    def release(self, ranks: tuple[int, ...]) -> None:
        """Count one user less; the last one destroys the group (unless another set shares it)."""
        users = self._users.get(ranks, 0) - 1
        if users > 0:
            self._users[ranks] = users
            return
        self._users.pop(ranks, None)
        group = self._groups.pop(ranks, None)
        if group is None or any(other is group for other in self._groups.values()):
            return
        logger.debug("destroying the process group of global ranks %s", list(ranks))
        dist.destroy_process_group(group)

    def __len__(self) -> int:
        return len(self._groups)


_shared: tuple[weakref.ref[ProcessGroup], SharedGroups] | None = None


def shared_groups() -> SharedGroups:
    """The registry of the current default group ([Note: groups are shared between grids])."""
    global _shared
    world = dist.group.WORLD
    if not isinstance(world, ProcessGroup):
        raise RuntimeError(
            "torch.distributed has no default process group; call "
            "torch.distributed.init_process_group(...) before building a grid."
        )
    # A weak reference: the registry must not keep the default group alive (see the Note).
    if _shared is None or _shared[0]() is not world:
        _shared = (weakref.ref(world), SharedGroups())
    return _shared[1]


class GroupCache:
    """The groups of one grid, keyed by their sorted topology ranks, in their kept form.

    Kept form: None stands for the default group ([Note: the default group is never kept]).

    Args:
        process_group: the group the grid lives in.
        global_ranks: global rank of each topology rank, or None when the grid spans the
            default group (topology rank == global rank).
        rank: this process's topology rank.
        world_size: the number of topology ranks.
    """

    def __init__(
        self,
        process_group: ProcessGroup,
        global_ranks: tuple[int, ...] | None,
        rank: int,
        world_size: int,
    ) -> None:
        self.process_group = none_if_default(process_group)
        """The grid's group, kept: None for the default group."""
        self._global_ranks = global_ranks
        self._rank = rank
        self._world_size = world_size
        self._split = uses_split_group()
        # None marks a set created by every rank that this rank is not a member of.
        self._groups: dict[tuple[int, ...], ProcessGroup | None] = {}
        self._closed = False
        self.collective_calls = 0
        """Group-creating calls this rank made that every rank of the grid made too."""
        self.local_calls = 0
        """Single-rank groups this rank created on its own."""

    def to_global(self, rank: int) -> int:
        return rank if self._global_ranks is None else self._global_ranks[rank]

    def kept(self, ranks: tuple[int, ...]) -> ProcessGroup | None:
        """The kept form of the group of ``ranks``, a created set that has this rank as member.

        Raises:
            LookupError: the set was never created, or this rank is not in it.
        """
        self._require_open()
        if len(ranks) == self._world_size:
            return self.process_group
        group = self._groups.get(ranks)
        if group is None:
            raise LookupError(f"no group of topology ranks {list(ranks)} on rank {self._rank}")
        return group

    def create(self, rank_sets: Sequence[tuple[int, ...]]) -> None:
        """Create the groups of ``rank_sets`` (sorted, deduplicated) that do not exist yet.

        Collective over the grid's group: every rank passes the same sets in the same order.
        The sets of one call must not overlap when groups are split (one family per call).
        A set some live grid already created is shared ([Note: groups are shared between
        grids]) and costs no call.
        """
        self._require_open()
        shared = shared_groups()
        pending = []
        for ranks in dict.fromkeys(rank_sets):
            if len(ranks) == self._world_size or ranks in self._groups:
                continue
            if len(ranks) == 1 and ranks[0] != self._rank and not self._split:
                continue  # created by its only member alone, see [Note: one creation order]
            found, group = shared.get(self._global_key(ranks))
            if found:
                self._hold(ranks, group)
            else:
                pending.append(ranks)
        if self._split:
            self._split_groups(pending)
            return
        for ranks in pending:
            local = len(ranks) == 1
            self._hold(ranks, self._new_group(ranks, local=local))
            if local:
                self.local_calls += 1
            else:
                self.collective_calls += 1

    def close(self) -> None:
        """Give back this grid's groups; a group no other live grid holds is destroyed.

        Every rank must close its grids in the same order relative to constructing others
        ([Note: groups are shared between grids]). Closing twice does nothing.
        """
        if self._closed:
            return
        self._closed = True
        shared = shared_groups() if dist.is_initialized() else None
        for ranks in self._groups:
            if shared is not None:
                shared.release(self._global_key(ranks))
        self._groups.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this grid was closed (close() gave its process groups back); build a new "
                "PipelineParallelGrid (or PipelineModule) to communicate again."
            )

    def _global_key(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.to_global(r) for r in ranks)

    def _hold(self, ranks: tuple[int, ...], group: ProcessGroup | None) -> None:
        self._groups[ranks] = group
        shared_groups().acquire(self._global_key(ranks), group)

    def _new_group(self, ranks: tuple[int, ...], *, local: bool) -> ProcessGroup | None:
        """``new_group`` of the ranks; None on non-members (torch returns a sentinel int)."""
        global_ranks = [self.to_global(r) for r in ranks]
        logger.debug("creating process group of global ranks %s", global_ranks)
        group = dist.new_group(ranks=global_ranks, use_local_synchronization=local)
        if self._rank not in ranks:
            return None
        if not isinstance(group, ProcessGroup):
            raise RuntimeError(
                f"torch.distributed.new_group({global_ranks}) returned {group!r} on global "
                f"rank {dist.get_rank()}, a member; the default process group is unusable."
            )
        return group

    def _split_groups(self, pending: list[tuple[int, ...]]) -> None:
        if not pending:
            return
        logger.debug("splitting %d process groups from the grid's group", len(pending))
        # split_group takes ranks of the parent group, which are exactly topology ranks.
        group = dist.split_group(
            parent_pg=default_if_none(self.process_group),
            split_ranks=[list(ranks) for ranks in pending],
        )
        self.collective_calls += 1
        for ranks in pending:
            self._hold(ranks, group if self._rank in ranks else None)
