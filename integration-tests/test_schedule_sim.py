"""tools/schedule_sim.py: torch's own schedule orders, timed, against the closed forms."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_schedules import RankTrace, step_costs
from tools.schedule_sim import (
    SCHEDULES,
    Action,
    Costs,
    MeasuredCosts,
    closed_form_bubble,
    simulate,
    simulate_schedule,
    torch_order,
)

EQUAL = Costs(forward=1.0, input_grad=1.0, weight_grad=1.0)
UNEVEN = Costs(forward=1.0, input_grad=3.0, weight_grad=0.5)


def _stages_per_rank(name: str) -> int:
    return 1 if name in ("GPipe", "1F1B") else 2


@pytest.mark.parametrize("name", ["GPipe", "1F1B"])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("microbatches", [1, 4, 5, 8, 16, 17])
@pytest.mark.parametrize("costs", [EQUAL, UNEVEN])
def test_single_stage_schedules_match_the_closed_form(
    name: str, ranks: int, microbatches: int, costs: Costs
) -> None:
    if name == "1F1B" and microbatches < ranks:
        pytest.skip("1F1B needs m >= p")
    simulation = simulate_schedule(name, ranks, microbatches, costs)
    assert simulation.bubble == pytest.approx(closed_form_bubble(name, ranks, microbatches))
    work = costs.forward + costs.input_grad + costs.weight_grad
    assert simulation.ideal == pytest.approx(microbatches * work)


@pytest.mark.parametrize("name", ["Interleaved1F1B", "LoopedBFS"])
@pytest.mark.parametrize(
    ("ranks", "microbatches"),
    [(2, 2), (2, 4), (2, 6), (3, 6), (4, 4), (4, 8), (4, 16), (8, 16), (8, 32)],
)
@pytest.mark.parametrize("stages_per_rank", [2, 3, 4])
def test_interleaved_schedules_match_the_closed_form(
    name: str, ranks: int, microbatches: int, stages_per_rank: int
) -> None:
    simulation = simulate_schedule(name, ranks, microbatches, EQUAL, stages_per_rank)
    expected = closed_form_bubble(name, ranks, microbatches, stages_per_rank)
    assert simulation.bubble == pytest.approx(expected)
    assert simulation.mean_bubble == pytest.approx(expected)  # every rank does the same work


def test_the_review_s_e6_numbers() -> None:
    """p = 4 with F = 1, B = 2, I = W = 1 per rank share (peers-pipelining.md, E6)."""
    expected = {
        ("Interleaved1F1B", 8): 3 / 19,
        ("InterleavedZeroBubble", 8): 1.5 / 25.5,
        ("ZBVZeroBubble", 8): 1.5 / 25.5,
        ("InterleavedZeroBubble", 16): 1.5 / 49.5,
        ("ZBVZeroBubble", 16): 1.5 / 49.5,
    }
    for (name, microbatches), bubble in expected.items():
        simulation = simulate_schedule(name, 4, microbatches, EQUAL, 2)
        assert simulation.bubble == pytest.approx(bubble), name


def test_dual_pipe_v_sends_the_overlapped_forward_after_its_backward() -> None:
    """E6 tied DualPipeV with ZBV (5.9% at p = 4, m = 8) because it timed computations only.
    torch's lowered order sends an OVERLAP_F_B's forward output after the backward beside it,
    and the next stage waits for that send: 3 / 27 = 11.1%."""
    order, _ = torch_order("DualPipeV", 4, 8, 2)
    sends = [i for i, a in enumerate(order[1]) if a == Action("SEND_F", 1, 6)]
    assert order[1][sends[0] - 2 : sends[0]] == [Action("F", 1, 6), Action("B", 6, 2)]
    assert simulate(order, EQUAL, 2).bubble == pytest.approx(3 / 27)
    # Timed as if every output were sent when computed, it would tie with ZBV:
    computed_only = [[a for a in actions if not a.kind.startswith("SEND")] for actions in order]
    assert simulate(computed_only, EQUAL, 2).bubble == pytest.approx(1.5 / 25.5)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("microbatches", [8, 16])
def test_every_rank_runs_each_of_its_stages_work_once(name: str, microbatches: int) -> None:
    ranks, v = 4, _stages_per_rank(name)
    order, stage_rank = torch_order(name, ranks, microbatches, v)
    assert sorted(stage_rank) == list(range(ranks * v))
    if name in ("ZBVZeroBubble", "DualPipeV"):
        assert all(stage_rank[s] == min(s, 2 * ranks - 1 - s) for s in stage_rank)
    else:
        assert all(stage_rank[s] == s % ranks for s in stage_rank)
    for rank, actions in enumerate(order):
        assert all(stage_rank[a.stage] == rank for a in actions)
        counts = Counter((a.kind, a.stage, a.mb) for a in actions)
        for position, sent in enumerate(actions):  # a send follows what it sends
            if sent.kind.startswith("SEND"):
                produced = ("F",) if sent.kind == "SEND_F" else ("I", "B")
                assert any(
                    (a.kind, a.stage, a.mb) == (k, sent.stage, sent.mb)
                    for a in actions[:position]
                    for k in produced
                )
        assert all(count == 1 for count in counts.values()), counts
        for stage in (s for s, r in stage_rank.items() if r == rank):
            for mb in range(microbatches):
                assert ("F", stage, mb) in counts
                split = ("I", stage, mb) in counts and ("W", stage, mb) in counts
                assert split != (("B", stage, mb) in counts)


def test_gpipe_and_1f1b_orders_agree_with_torch_s_ir_except_its_last_rank_bug() -> None:
    """The hand-built orders equal torch's _get_pipeline_order where that IR is right; on the
    last rank 1F1B's IR forwards micro-batches 1..m instead of 0..m-1 (review §1.3)."""
    from unittest import mock

    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe

    ranks, microbatches = 4, 8
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = 0, ranks, None
    stage.num_stages = ranks
    for cls, name in ((ScheduleGPipe, "GPipe"), (Schedule1F1B, "1F1B")):
        ir = cls(stage, n_microbatches=microbatches).pipeline_order
        assert ir is not None
        order, _ = torch_order(name, ranks, microbatches)
        for rank in range(ranks):
            torch_actions = [
                Action(a.computation_type.value, a.stage_index, a.microbatch_index)  # type: ignore[arg-type]
                for a in ir[rank]
                if a is not None and a.computation_type.value in ("F", "B")
            ]
            if name == "1F1B" and rank == ranks - 1:
                assert [a.mb for a in torch_actions if a.kind == "F"] == list(
                    range(1, microbatches + 1)
                )
                continue
            assert order[rank] == torch_actions, (name, rank)


def test_stage_zero_runs_its_whole_backward_at_w() -> None:
    costs = Costs(forward=1.0, input_grad=2.0, weight_grad=0.5)
    assert costs.of("I", 0, 2) == 0.0
    assert costs.of("W", 0, 2) == pytest.approx(1.25)
    assert costs.of("I", 3, 2) == pytest.approx(1.0)
    assert costs.of("W", 3, 2) == pytest.approx(0.25)
    assert costs.of("B", 0, 1) == pytest.approx(2.5)
    # So every rank still does m * (F + I + W):
    simulation = simulate_schedule("ZBVZeroBubble", 4, 8, costs, 2)
    assert simulation.busy == pytest.approx([8 * 3.5] * 4)


def test_an_order_that_waits_on_itself_is_reported() -> None:
    order = [[Action("B", 0, 0), Action("F", 0, 0)], [Action("F", 1, 0), Action("B", 1, 0)]]
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(order, EQUAL, 1)


def test_refused_configurations_raise_value_error() -> None:
    with pytest.raises(ValueError, match="n_microbatches"):
        torch_order("1F1B", 4, 3)
    with pytest.raises(ValueError, match="one stage per rank"):
        torch_order("GPipe", 4, 8, 2)
    with pytest.raises(ValueError, match="2 stages per rank"):  # torch's own check
        torch_order("ZBVZeroBubble", 4, 8, 3)


def _nominal_as_measured(costs: Costs, name: str, stages_per_rank: int) -> MeasuredCosts:
    order, _ = torch_order(name, 4, 8, stages_per_rank)
    kinds = {
        (a.kind, a.stage) for actions in order for a in actions if a.kind in ("F", "I", "W", "B")
    }
    return MeasuredCosts({key: costs.of(key[0], key[1], stages_per_rank) for key in kinds})


@pytest.mark.parametrize("name", SCHEDULES)
def test_measured_costs_equal_to_the_nominal_ones_give_the_nominal_step(name: str) -> None:
    v = _stages_per_rank(name)
    nominal = simulate_schedule(name, 4, 8, UNEVEN, v)
    measured = simulate_schedule(name, 4, 8, _nominal_as_measured(UNEVEN, name, v), v)
    assert measured.makespan == pytest.approx(nominal.makespan)


def test_an_overhead_per_action_costs_every_action_of_the_critical_path() -> None:
    """GPipe at p = 2, m = 1: F0, F1, B1, B0 run one after the other, 4 actions."""
    base = _nominal_as_measured(EQUAL, "GPipe", 1)
    slower = MeasuredCosts(base.durations, overhead=0.25)
    order, _ = torch_order("GPipe", 2, 1)
    assert simulate(order, slower, 1).makespan == pytest.approx(
        simulate(order, base, 1).makespan + 4 * 0.25
    )


@pytest.mark.parametrize("name", ["GPipe", "1F1B", "ZBVZeroBubble", "DualPipeV"])
def test_latency_delays_every_message_between_ranks_and_none_within_one(name: str) -> None:
    v = _stages_per_rank(name)
    order, stage_rank = torch_order(name, 4, 8, v)
    free = simulate(order, EQUAL, v)
    slow = simulate(order, EQUAL, v, latency=0.1)
    # The first micro-batch's forward reaches the last stage through 3 messages with one stage
    # per rank, and through 6 under V placement: stage 3 hands to stage 4 on rank 3 directly.
    last = 4 * v - 1
    messages = sum(stage_rank[s] != stage_rank[s + 1] for s in range(last))
    assert messages == (3 if v == 1 else 6)
    first_at_last = Action("F", last, 0)
    assert slow.start[first_at_last] == pytest.approx(free.start[first_at_last] + 0.1 * messages)
    assert slow.makespan > free.makespan
    with pytest.raises(ValueError, match="latency"):
        simulate(order, EQUAL, v, latency=-1.0)


def test_measured_costs_name_a_missing_action() -> None:
    costs = MeasuredCosts({("F", 0): 1.0})
    with pytest.raises(ValueError, match="no measured duration for B of stage 0"):
        costs.of("B", 0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        MeasuredCosts({("F", 0): -1.0})


def _two_rank_trace() -> list[RankTrace]:
    """GPipe, p = 2, m = 1, at t = 100 s: rank 0 runs F0 (1 s) and sends; rank 1 waits for it
    from 100.2 s, gets it 0.1 s after the send, runs F1 + loss and B1, sends; rank 0 waits and
    runs B0. Every gap that is not a wait or a computation is bookkeeping."""
    rank0 = RankTrace(
        start=100.0,
        end=106.0,
        actions=[("F", 0, 0, 100.1, 101.1), ("B", 0, 0, 104.6, 106.6 - 0.8)],
        waits=[(101.2, 104.5)],
        sends={"SEND_F/0/0": 101.15},
    )
    rank1 = RankTrace(
        start=100.0,
        end=106.0,
        actions=[("F", 1, 0, 101.3, 102.3), ("L", 1, 0, 102.3, 102.4), ("B", 1, 0, 102.4, 104.4)],
        waits=[(100.2, 101.25)],
        sends={"SEND_B/1/0": 104.45},
    )
    return [rank0, rank1]


def test_step_costs_reduce_the_traces_to_what_the_simulation_takes() -> None:
    costs = step_costs(_two_rank_trace())
    assert costs.durations == pytest.approx({"F0": 1.0, "B0": 1.2, "F1": 1.1, "B1": 2.0})
    # Rank 0 waited for B1's gradient from 101.2, before it was sent at 104.45: 0.05 s late.
    # Rank 1 waited for F0 from 100.2, before its send at 101.15: 0.1 s late. Median 0.075.
    assert costs.latency == pytest.approx(0.075)
    assert costs.latency_samples == 2
    # Rank 0: span 100.1..105.8 (5.7 s), 2.2 s computing, 3.3 s waiting: 0.2 s over 2 actions.
    # Rank 1: span 101.3..104.4, all computing: 0. The mean over ranks:
    assert costs.overhead == pytest.approx((0.1 + 0.0) / 2)
    assert costs.head == pytest.approx(0.1)
    assert costs.tail == pytest.approx(106.0 - 105.8)


def test_a_message_that_was_already_there_is_no_latency_sample() -> None:
    traces = _two_rank_trace()
    traces[1].waits = [(101.2, 101.25)]  # began after the send: it measures nothing
    costs = step_costs(traces)
    assert costs.latency_samples == 1
    assert costs.latency == pytest.approx(0.05)


def test_the_measured_simulation_replays_the_traced_step() -> None:
    """Fed back its own costs, the simulation of the traced GPipe step ends where it ended."""
    costs = step_costs(_two_rank_trace())
    order, _ = torch_order("GPipe", 2, 1)
    simulation = simulate(order, costs.simulation_costs(), 1, costs.latency)
    assert simulation.start[Action("F", 1, 0)] == pytest.approx(1.0 + 0.05 + 0.075)
    assert costs.head + simulation.makespan + costs.tail == pytest.approx(
        0.1 + (1.05 + 0.075 + 1.15 + 2.05 + 0.075 + 1.25) + 0.2
    )
