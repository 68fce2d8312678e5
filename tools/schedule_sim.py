"""Simulate torch.distributed.pipelining's own schedules: each rank's action order, timed.

The order is the one torch's runtime executes, not a textbook one:

* multi-stage schedules (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble,
  DualPipeV) are instantiated over mock stages, as torch's ``get_schedule_ops`` does, and each
  rank's compute actions are read from ``pipeline_order_with_comms``: the lowered list that
  ``_PipelineScheduleRuntime._step_microbatches`` walks. ``OVERLAP_F_B`` is expanded into its
  sub-actions, which the runtime runs one after the other;
* GPipe and 1F1B do not run an action list (``PipelineScheduleSingle._step_microbatches`` is
  hand-written, and ``Schedule1F1B._get_pipeline_order`` gives the last rank the wrong
  micro-batches), so their order is rebuilt from that code: GPipe runs every forward, then every
  backward, in micro-batch order; 1F1B runs ``min(m, p - stage)`` forwards, then alternates one
  backward and one forward, then the remaining backwards.

Timing: every action starts at the later of its rank's clock and the time the data it needs
exists, and a rank runs its actions strictly in order:

* ``F(s, mb)`` needs ``F(s - 1, mb)``;
* ``B(s, mb)`` or ``I(s, mb)`` needs ``F(s, mb)`` and the input gradient from stage ``s + 1``
  (its ``B`` or ``I``);
* ``W(s, mb)`` needs ``I(s, mb)``.

Data from another rank exists ``latency`` after that rank reaches the ``SEND_F`` / ``SEND_B``
action of torch's lowered order (a send itself takes no time), not when the computation ends:
the two differ where the runtime runs something between them, as DualPipeV does, whose
``OVERLAP_F_B`` sends the forward's output only after the backward beside it. The hand-written
GPipe and 1F1B post every send right after its computation. Two stages on one rank (V
placement) hand over directly, without latency. The latency is 0 unless given: the nominal
expectation treats communication as free, the measured one (tools/bench_schedules.py) passes
what its run measured.

Durations come from an :class:`ActionCosts`. :class:`Costs` is the nominal one: F, I and W
per rank share of layers divided by the stages a rank holds, and B = I + W. It keeps one quirk
of torch: stage 0 has no input to differentiate, so its ``I`` does nothing (it only waits for
the gradient from stage 1) and its ``W`` runs the whole backward
(``PipelineStage.backward_weight_one_chunk`` for stage 0 calls the full backward), costing
I + W. :class:`MeasuredCosts` holds what a run measured, per action kind and stage, plus a
per-action runtime overhead; the quirk is then in the numbers themselves.

The *ideal* step time is the busiest rank's work; the bubble fraction is
``1 - ideal / makespan``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pipemodule import SCHEDULES as PIPESTACK_SCHEDULES

__all__ = [
    "SCHEDULES",
    "Action",
    "ActionCosts",
    "Costs",
    "MeasuredCosts",
    "Simulation",
    "closed_form_bubble",
    "simulate",
    "simulate_schedule",
    "torch_order",
]

Kind = Literal["F", "I", "W", "B", "SEND_F", "SEND_B"]

SCHEDULES: tuple[str, ...] = tuple(
    cls.__name__.removeprefix("Schedule") for cls in PIPESTACK_SCHEDULES.values()
)
"""torch 2.13's schedule names, as ``get_schedule_class`` accepts them (pipestack's list)."""

_SINGLE = ("GPipe", "1F1B")
_KINDS: dict[str, Kind] = {
    "F": "F",
    "I": "I",
    "W": "W",
    "B": "B",
    "SEND_F": "SEND_F",
    "SEND_B": "SEND_B",
}


@dataclass(frozen=True)
class Action:
    """One action: ``kind`` of micro-batch ``mb`` on stage ``stage``; the sends cost nothing."""

    kind: Kind
    stage: int
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"


class ActionCosts(Protocol):
    """What one action of a stage costs; :func:`simulate` asks for every action it times."""

    def of(self, kind: Kind, stage: int, stages_per_rank: int) -> float:
        """The duration of one ``kind`` action on ``stage`` (sends: 0)."""
        ...


@dataclass(frozen=True)
class Costs:
    """Seconds (or any unit) of work per rank share of layers: forward, input grad, weight grad.

    A stage of a rank holding ``v`` stages costs ``1 / v`` of these.
    """

    forward: float
    input_grad: float
    weight_grad: float

    def of(self, kind: Kind, stage: int, stages_per_rank: int) -> float:
        """The duration of one ``kind`` action on ``stage``, torch's stage-0 quirk included."""
        if kind in ("SEND_F", "SEND_B"):
            return 0.0
        if kind == "F":
            work = self.forward
        elif kind == "B":
            work = self.input_grad + self.weight_grad
        elif kind == "I":
            work = 0.0 if stage == 0 else self.input_grad
        else:
            work = self.weight_grad + (self.input_grad if stage == 0 else 0.0)
        return work / stages_per_rank


@dataclass(frozen=True)
class MeasuredCosts:
    """Durations as a run had them: mean seconds per ``(kind, stage)`` and a per-action overhead.

    ``durations`` is what the stage's own computation took (for the last stage's ``F``, the
    loss too); ``overhead`` is the runtime's time per computation outside it and outside
    waiting (posting sends and receives, bookkeeping), added to every computation.
    """

    durations: Mapping[tuple[str, int], float] = field(hash=False)
    overhead: float = 0.0

    def __post_init__(self) -> None:
        bad = {key: value for key, value in self.durations.items() if not value >= 0}
        if bad or not self.overhead >= 0:
            raise ValueError(
                f"measured durations must be >= 0 seconds: got {bad or ''} "
                f"overhead={self.overhead!r}; a negative time means the timings were mixed up"
            )

    def of(self, kind: Kind, stage: int, stages_per_rank: int) -> float:
        """The measured duration of one ``kind`` action on ``stage``, with the overhead."""
        if kind in ("SEND_F", "SEND_B"):
            return 0.0
        found = self.durations.get((kind, stage))
        if found is None:
            measured = ", ".join(f"{k}{s}" for k, s in sorted(self.durations, key=str))
            raise ValueError(
                f"no measured duration for {kind} of stage {stage}; measured: {measured}. "
                f"Measure the same schedule and stages the order comes from"
            )
        return found + self.overhead


@dataclass(frozen=True)
class Simulation:
    """The timed schedule: when every action ran, each rank's work, the makespan."""

    order: tuple[tuple[Action, ...], ...]
    start: dict[Action, float]
    end: dict[Action, float]
    busy: tuple[float, ...]
    makespan: float

    @property
    def ideal(self) -> float:
        """The busiest rank's work: the step time without any bubble."""
        return max(self.busy)

    @property
    def bubble(self) -> float:
        """``1 - ideal / makespan``: the share of the step the busiest rank waits."""
        return 1.0 - self.ideal / self.makespan

    @property
    def mean_bubble(self) -> float:
        """``1 - total work / (ranks * makespan)``: the idle share over all ranks."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


_Need = tuple[Action, float]  # what must have run, and the delay after its end


def _single_order(name: str, num_ranks: int, n_microbatches: int) -> list[list[Action]]:
    order: list[list[Action]] = []
    for stage in range(num_ranks):
        forwards = [Action("F", stage, mb) for mb in range(n_microbatches)]
        backwards = [Action("B", stage, mb) for mb in range(n_microbatches)]
        if name == "GPipe":
            order.append(forwards + backwards)
            continue
        warmup = min(n_microbatches, num_ranks - stage)
        actions = forwards[:warmup]
        for mb in range(n_microbatches):
            actions.append(backwards[mb])
            if warmup + mb < n_microbatches:
                actions.append(forwards[warmup + mb])
        order.append(actions)
    return order


def _multi_order(
    name: str, num_ranks: int, n_microbatches: int, stages_per_rank: int
) -> tuple[list[list[Action]], dict[int, int]]:
    from unittest import mock

    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import (
        _Action,
        _PipelineScheduleRuntime,
        get_schedule_class,
    )

    # The mock stages that torch's own get_schedule_ops builds; every rank's order is computed
    # on each rank, so rank 0's schedule object holds them all.
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank = 0
    stage.group_size = num_ranks
    stage.submod = None
    stage.num_stages = num_ranks * stages_per_rank
    schedule = get_schedule_class(name)([stage] * stages_per_rank, n_microbatches)
    if not isinstance(schedule, _PipelineScheduleRuntime):
        raise TypeError(f"{name} is not an action-list schedule")

    def expand(action: _Action) -> list[Action]:
        if action.sub_actions is not None:  # OVERLAP_F_B: run in order by the runtime
            return [a for sub in action.sub_actions for a in expand(sub)]
        kind = _KINDS.get(action.computation_type.value)
        if kind is None:
            return []  # receives (waited on by the computation), REDUCE_GRAD, UNSHARD/RESHARD
        assert action.microbatch_index is not None
        return [Action(kind, action.stage_index, action.microbatch_index)]

    order = [
        [a for action in schedule.pipeline_order_with_comms[rank] for a in expand(action)]
        for rank in range(num_ranks)
    ]
    return order, dict(schedule.stage_index_to_group_rank)


def torch_order(
    name: str, num_ranks: int, n_microbatches: int, stages_per_rank: int = 1
) -> tuple[list[list[Action]], dict[int, int]]:
    """Each rank's actions as torch runs them (computations and sends), and every stage's rank.

    Raises ``ValueError`` where torch's schedule refuses the configuration.
    """
    if name in _SINGLE:
        if stages_per_rank != 1:
            raise ValueError(f"{name} runs one stage per rank, not {stages_per_rank}")
        if name == "1F1B" and n_microbatches < num_ranks:
            raise ValueError(f"1F1B needs n_microbatches >= {num_ranks}")
        return _single_order(name, num_ranks, n_microbatches), {s: s for s in range(num_ranks)}
    return _multi_order(name, num_ranks, n_microbatches, stages_per_rank)


def simulate(
    order: Sequence[Sequence[Action]],
    costs: ActionCosts,
    stages_per_rank: int,
    latency: float = 0.0,
) -> Simulation:
    """Time ``order`` (one action list per rank): see the module docstring for the rules.

    ``latency`` is the seconds from a send to the data's arrival on another rank.
    """
    if not latency >= 0:
        raise ValueError(f"latency={latency!r} must be >= 0 seconds")
    num_stages = len(order) * stages_per_rank
    end: dict[Action, float] = {}
    start: dict[Action, float] = {}
    position = [0] * len(order)
    clock = [0.0] * len(order)
    busy = [0.0] * len(order)
    remaining = sum(len(actions) for actions in order)
    present = {action for actions in order for action in actions}
    rank_of = {a.stage: rank for rank, actions in enumerate(order) for a in actions}

    def arrival(producer: Action, consumer_stage: int, send: Kind) -> _Need | None:
        """What must have run for ``producer``'s data to reach ``consumer_stage``, and when."""
        if producer not in present:
            return None
        if rank_of[producer.stage] == rank_of[consumer_stage]:
            return producer, 0.0
        sent = Action(send, producer.stage, producer.mb)
        return (sent if sent in present else producer), latency

    def grad_from_next(stage: int, mb: int) -> _Need | None:
        for kind in ("I", "B"):
            found = arrival(Action(kind, stage + 1, mb), stage, "SEND_B")
            if found is not None:
                return found
        return None

    def ready_at(action: Action) -> float | None:
        """When ``action``'s inputs exist, or None while one is not computed yet."""
        needs: list[_Need | None] = []
        if action.kind == "F":
            if action.stage > 0:
                producer = Action("F", action.stage - 1, action.mb)
                needs.append(arrival(producer, action.stage, "SEND_F"))
        elif action.kind in ("I", "B"):
            needs.append((Action("F", action.stage, action.mb), 0.0))
            if action.stage < num_stages - 1:
                needs.append(grad_from_next(action.stage, action.mb))
        elif action.kind == "W":
            needs.append((Action("I", action.stage, action.mb), 0.0))
        met: list[_Need] = [need for need in needs if need is not None and need[0] in end]
        if len(met) < len(needs):
            return None
        return max((end[done] + delay for done, delay in met), default=0.0)

    while remaining:
        progressed = False
        for rank, actions in enumerate(order):
            while position[rank] < len(actions):
                action = actions[position[rank]]
                ready = ready_at(action)
                if ready is None:
                    break
                duration = costs.of(action.kind, action.stage, stages_per_rank)
                start[action] = max(clock[rank], ready)
                end[action] = clock[rank] = start[action] + duration
                busy[rank] += duration
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {rank: str(actions[position[rank]]) for rank, actions in enumerate(order)}
            raise RuntimeError(f"the schedule deadlocks: next actions {stuck}")
    return Simulation(
        order=tuple(tuple(actions) for actions in order),
        start=start,
        end=end,
        busy=tuple(busy),
        makespan=max(clock),
    )


def simulate_schedule(
    name: str,
    num_ranks: int,
    n_microbatches: int,
    costs: ActionCosts,
    stages_per_rank: int = 1,
    latency: float = 0.0,
) -> Simulation:
    """:func:`torch_order` timed by :func:`simulate`."""
    order, _ = torch_order(name, num_ranks, n_microbatches, stages_per_rank)
    return simulate(order, costs, stages_per_rank, latency)


def closed_form_bubble(
    name: str, num_ranks: int, n_microbatches: int, stages_per_rank: int = 1
) -> float:
    """The textbook bubble fraction: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) for
    Interleaved1F1B and LoopedBFS (equal stage costs, no communication)."""
    p, m, v = num_ranks, n_microbatches, stages_per_rank
    if name in _SINGLE:
        return (p - 1) / (m + p - 1)
    if name in ("Interleaved1F1B", "LoopedBFS"):
        return (p - 1) / (v * m + p - 1)
    raise ValueError(f"no closed form for {name}")
