"""How many micro-batches each stage holds activations for, in the order torch runs them.

A micro-batch's saved activations live on a stage from its forward (F) until its backward: a
full backward (B), or for the split backward of the zero-bubble schedules the weight part (W).
torch's input part (I) keeps the graph W starts from and releases the rest, so between I and
W a micro-batch holds only part of its saves (``after_input_bytes``, measured on meta by
``activations.py``). Counting F, I and B/W along each rank's action list gives the bytes held
at every moment; the peak is what a stage must hold memory for.

The action lists are torch's own:

- multi-stage schedules (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble,
  DualPipeV) run their ``pipeline_order``, which is read from a schedule built over stand-in
  stages (as torch's ``_schedule_visualizer.get_schedule_ops`` does); an ``OVERLAP_F_B``
  action counts as its forward, then its backward.
- single-stage schedules run ``_step_microbatches``, not their ``pipeline_order`` (whose 1F1B
  version gives the last rank forwards for micro-batches 1..m instead of 0..m-1), so their
  order is the one that method executes: GPipe every forward then every backward; 1F1B
  ``min(m, P - s)`` forwards on stage s, then one backward and one forward in turn.

This module reads schedule classes only: it creates no process group and sends nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from unittest import mock

__all__ = ["Action", "ScheduleOrder", "StagePeak", "schedule_order"]


class Action(NamedTuple):
    """One compute step of a rank: ``kind`` F, B, I or W of ``microbatch`` on ``stage``."""

    kind: str
    stage: int
    microbatch: int


class StagePeak(NamedTuple):
    """A stage's most saved bytes at once, and the micro-batches it holds at that moment.

    ``microbatches``: forward done, backward (B or W) not yet; ``after_input_pass``: of those,
    the ones whose input-gradient pass (I) ran, holding only what W needs.
    """

    microbatches: int
    after_input_pass: int
    saved_bytes: int


@dataclass(frozen=True)
class ScheduleOrder:
    """Every pipe rank's compute steps, in the order a schedule runs them."""

    schedule: str
    pipe_ranks: int
    stages_per_rank: int
    n_microbatches: int
    ranks: tuple[tuple[Action, ...], ...]

    @property
    def num_stages(self) -> int:
        return self.pipe_ranks * self.stages_per_rank

    def stages_of(self, pipe_rank: int) -> tuple[int, ...]:
        """The stages ``pipe_rank`` runs, ascending."""
        return tuple(sorted({action.stage for action in self.ranks[pipe_rank]}))

    def in_flight(self) -> tuple[int, ...]:
        """The most micro-batches each stage holds activations for at once."""
        peaks = [0] * self.num_stages
        for actions in self.ranks:
            held = [0] * self.num_stages
            for action in actions:
                held[action.stage] += _change(action.kind)
                peaks[action.stage] = max(peaks[action.stage], held[action.stage])
        return tuple(peaks)

    @property
    def splits_backward(self) -> bool:
        """Whether some backward runs as separate input (I) and weight (W) passes."""
        return any(action.kind == "I" for actions in self.ranks for action in actions)

    def stage_peaks(
        self, saved_bytes: Sequence[int], after_input_bytes: Sequence[int] | None = None
    ) -> tuple[StagePeak, ...]:
        """Each stage's most saved bytes at once along its rank's order, and what it holds then.

        ``saved_bytes[s]``: what stage s saves per micro-batch at its forward;
        ``after_input_bytes[s]``: what of it is still held between I and W (default: all).
        """
        saved, after = self._per_stage(saved_bytes, after_input_bytes)
        peaks = [StagePeak(0, 0, 0)] * self.num_stages
        for actions in self.ranks:
            full = [0] * self.num_stages
            split = [0] * self.num_stages
            for action in actions:
                stage = action.stage
                full[stage] += _full_change(action.kind)
                split[stage] += _split_change(action.kind)
                held = full[stage] * saved[stage] + split[stage] * after[stage]
                if held > peaks[stage].saved_bytes:
                    peaks[stage] = StagePeak(full[stage] + split[stage], split[stage], held)
        return tuple(peaks)

    def rank_peaks(
        self, saved_bytes: Sequence[int], after_input_bytes: Sequence[int] | None = None
    ) -> tuple[int, ...]:
        """Each rank's most saved bytes at once, given each stage's bytes per micro-batch.

        With several stages per rank the peak is not the sum of the stages' peaks: it is
        taken along the rank's own order. ``after_input_bytes`` as for :meth:`stage_peaks`.
        """
        saved, after = self._per_stage(saved_bytes, after_input_bytes)
        peaks = []
        for actions in self.ranks:
            live = peak = 0
            for action in actions:
                live += _full_change(action.kind) * saved[action.stage]
                live += _split_change(action.kind) * after[action.stage]
                peak = max(peak, live)
            peaks.append(peak)
        return tuple(peaks)

    def _per_stage(
        self, saved_bytes: Sequence[int], after_input_bytes: Sequence[int] | None
    ) -> tuple[Sequence[int], Sequence[int]]:
        after = saved_bytes if after_input_bytes is None else after_input_bytes
        for name, values in (("saved_bytes", saved_bytes), ("after_input_bytes", after)):
            if len(values) != self.num_stages:
                raise ValueError(
                    f"{name} has {len(values)} entries for {self.num_stages} stages; "
                    f"give one per stage"
                )
        return saved_bytes, after


def _change(kind: str) -> int:
    return {"F": 1, "B": -1, "W": -1}.get(kind, 0)


def _full_change(kind: str) -> int:
    # Micro-batches holding all their saves: from F until B, or until I hands them to W.
    return {"F": 1, "B": -1, "I": -1}.get(kind, 0)


def _split_change(kind: str) -> int:
    # Micro-batches holding what W needs: from I until W.
    return {"I": 1, "W": -1}.get(kind, 0)


def _single_stage_order(name: str, ranks: int, microbatches: int) -> list[tuple[Action, ...]]:
    order = []
    for stage in range(ranks):
        # 1F1B warms up as Schedule1F1B._step_microbatches does; GPipe runs every forward first.
        warmup = microbatches if name == "GPipe" else min(microbatches, ranks - stage)
        actions = [Action("F", stage, mb) for mb in range(warmup)]
        for mb in range(microbatches):
            actions.append(Action("B", stage, mb))
            if warmup + mb < microbatches:
                actions.append(Action("F", stage, warmup + mb))
        order.append(tuple(actions))
    return order


def _flat(action: Any) -> list[Action]:
    subs = getattr(action, "sub_actions", None)
    if subs:
        return [step for sub in subs for step in _flat(sub)]
    kind = str(action.computation_type.value)
    if kind not in ("F", "B", "I", "W"):
        return []  # communication, resharding, gradient reduction: no activations
    return [Action(kind, int(action.stage_index), int(action.microbatch_index))]


def _multi_stage_order(
    cls: type[Any], ranks: int, per_rank: int, microbatches: int
) -> list[tuple[Action, ...]]:
    from torch.distributed.pipelining import PipelineStage

    # Stand-in stages, like get_schedule_ops' (which also refuses one stage per rank): the
    # constructor reads only their rank, group size and stage count.
    stand_in = mock.create_autospec(PipelineStage, instance=True)
    stand_in.group_rank = 0
    stand_in.group_size = ranks
    stand_in.submod = None
    stand_in.num_stages = ranks * per_rank
    schedule = cls([stand_in] * per_rank, microbatches)
    return [
        tuple(step for action in schedule.pipeline_order[rank] if action for step in _flat(action))
        for rank in range(ranks)
    ]


def schedule_order(
    schedule: str, pipe_ranks: int, n_microbatches: int, stages_per_rank: int = 1
) -> ScheduleOrder:
    """The compute order of torch's ``schedule`` (any case) over ``pipe_ranks`` ranks.

    Raises:
        TypeError: ``schedule`` is not a string, or a count not an int.
        ValueError: an unknown schedule, or counts the schedule's constructor refuses (the
            message is torch's, with the values).
    """
    from torch.distributed.pipelining.schedules import (
        PipelineScheduleMulti,
        PipelineScheduleSingle,
        get_schedule_class,
    )

    if not isinstance(schedule, str):
        raise TypeError(f"schedule={schedule!r} is not a name; pass e.g. '1f1b' or 'gpipe'")
    for name, value in (
        ("pipe_ranks", pipe_ranks),
        ("n_microbatches", n_microbatches),
        ("stages_per_rank", stages_per_rank),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}={value!r} is a {type(value).__name__}; pass an int >= 1")
        if value < 1:
            raise ValueError(f"{name}={value} is too small; pass an int >= 1")
    try:
        cls = get_schedule_class(schedule)
    except ValueError:
        cls = None
    if cls is None or cls in (PipelineScheduleSingle, PipelineScheduleMulti):
        raise ValueError(
            f"schedule={schedule!r} is not one of torch's schedules; use e.g. 'gpipe', '1f1b', "
            f"'interleaved1f1b', 'loopedbfs', 'interleavedzerobubble', 'zbvzerobubble', "
            f"'dualpipev'"
        )
    name = cls.__name__.removeprefix("Schedule")
    if issubclass(cls, PipelineScheduleSingle):
        if stages_per_rank != 1:
            raise ValueError(
                f"schedule {name!r} runs one stage per rank, not stages_per_rank="
                f"{stages_per_rank}; pass 1 or use a multi-stage schedule"
            )
        if name == "1F1B" and n_microbatches < pipe_ranks:
            raise ValueError(
                f"1F1B needs at least as many micro-batches as stages: n_microbatches="
                f"{n_microbatches} < {pipe_ranks}; raise n_microbatches or use 'gpipe'"
            )
        ranks = _single_stage_order(name, pipe_ranks, n_microbatches)
    else:
        try:
            ranks = _multi_stage_order(cls, pipe_ranks, stages_per_rank, n_microbatches)
        except (ValueError, AssertionError) as error:
            raise ValueError(
                f"schedule {name!r} refuses {pipe_ranks} ranks x {stages_per_rank} stages with "
                f"n_microbatches={n_microbatches}: {error}"
            ) from None
    return ScheduleOrder(name, pipe_ranks, stages_per_rank, n_microbatches, tuple(ranks))
