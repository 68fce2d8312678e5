"""tools/schedule_sim.py: torch's own schedule orders, timed, against the closed forms."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.schedule_sim import (
    SCHEDULES,
    Action,
    Costs,
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
