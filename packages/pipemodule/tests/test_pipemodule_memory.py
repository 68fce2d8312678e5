"""The memory plan: saved activations on meta x micro-batches in flight in torch's order."""

from __future__ import annotations

import pytest
import torch

from pipemodule import (
    LayerSpec,
    SavedTensorCounter,
    estimate_stage_memory,
    plan_memory,
    plan_pipeline,
)
from pipemodule._layout import schedule_order, stage_activations

ROWS, WIDTH, HIDDEN = 4, 16, 32
FLOAT = 4
# Linear(16, 32) saves its input, Tanh its output, which Linear(32, 16) saves again (counted
# once), the last Tanh its output.
BLOCK_SAVED = FLOAT * ROWS * (WIDTH + HIDDEN + WIDTH)


def block() -> list[LayerSpec]:
    return [
        LayerSpec(torch.nn.Linear, WIDTH, HIDDEN),
        LayerSpec(torch.nn.Tanh),
        LayerSpec(torch.nn.Linear, HIDDEN, WIDTH),
        LayerSpec(torch.nn.Tanh),
    ]


def sample() -> torch.Tensor:
    return torch.empty(ROWS, WIDTH, device="meta")


def test_saved_bytes_are_what_autograd_keeps_once_per_storage() -> None:
    layout = plan_pipeline(block() * 2, num_stages=2, partition_method="uniform")
    found = stage_activations(layout, sample())
    assert [stage.saved_bytes for stage in found] == [BLOCK_SAVED, BLOCK_SAVED]
    assert all(stage.recompute_bytes == 0 for stage in found)


def test_checkpointed_chunks_keep_their_inputs_and_rebuild_one_chunk() -> None:
    layout = plan_pipeline(block() * 2, num_stages=2, partition_method="uniform")
    found = stage_activations(layout, sample(), activation_checkpoint_interval=2)
    # Chunks [Linear, Tanh] and [Linear, Tanh]: their inputs are 4x16 and 4x32 floats.
    kept = FLOAT * ROWS * (WIDTH + HIDDEN)
    assert [stage.saved_bytes for stage in found] == [kept, kept]
    assert [stage.recompute_bytes for stage in found] == [kept, kept]


def test_the_loss_saves_on_the_last_stage_only() -> None:
    layout = plan_pipeline(block() * 2, num_stages=2, partition_method="uniform")
    found = stage_activations(
        layout, sample(), loss_fn=torch.nn.functional.mse_loss, labels=sample()
    )
    # mse_loss saves the output (already saved by the Tanh) and the target.
    assert [stage.saved_bytes for stage in found] == [
        BLOCK_SAVED,
        BLOCK_SAVED + FLOAT * ROWS * WIDTH,
    ]


def test_the_counter_sees_the_same_bytes_in_a_real_step_and_frees_them_in_backward() -> None:
    layers = torch.nn.Sequential(*(spec.build() for spec in block()))
    counter = SavedTensorCounter([*layers.parameters()])
    x = torch.randn(ROWS, WIDTH)
    with counter.hooks():
        loss = layers(x).sum()
    assert counter.total_live_bytes == BLOCK_SAVED
    loss.backward()
    del loss
    assert counter.total_live_bytes == 0
    assert counter.total_peak_bytes == BLOCK_SAVED


@pytest.mark.parametrize(
    ("schedule", "ranks", "per_rank", "microbatches", "expected"),
    [
        ("gpipe", 4, 1, 8, (8, 8, 8, 8)),
        ("1f1b", 4, 1, 8, (4, 3, 2, 1)),
        ("1F1B", 2, 1, 2, (2, 1)),
        ("zbvzerobubble", 4, 2, 8, (8, 7, 6, 5, 4, 3, 2, 1)),
    ],
)
def test_microbatches_in_flight_follow_torchs_order(
    schedule: str, ranks: int, per_rank: int, microbatches: int, expected: tuple[int, ...]
) -> None:
    assert schedule_order(schedule, ranks, microbatches, per_rank).in_flight() == expected


def test_interleaving_raises_the_first_ranks_peak() -> None:
    # p + (p - 1) / v micro-batches of a rank's layers (peers' review, E6): 5.5 for p=4, v=2.
    order = schedule_order("interleaved1f1b", 4, 8, 2)
    assert order.rank_peaks([1] * 8) == (11, 9, 7, 5)


def test_single_stage_orders_start_every_rank_at_microbatch_zero() -> None:
    # torch's own 1F1B IR starts the last rank at micro-batch 1; the runtime does not.
    order = schedule_order("1f1b", 2, 4)
    assert [action.microbatch for action in order.ranks[1][:2]] == [0, 0]


def test_bad_schedules_and_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="not one of torch's schedules"):
        schedule_order("2f2b", 2, 4)
    with pytest.raises(ValueError, match="1F1B needs at least as many micro-batches"):
        schedule_order("1f1b", 4, 2)
    with pytest.raises(TypeError, match="schedule=3"):
        schedule_order(3, 2, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refuses"):
        schedule_order("interleaved1f1b", 2, 5, 2)


def test_plan_memory_adds_activations_to_the_static_bytes() -> None:
    layout = plan_pipeline(block() * 2, num_stages=2, partition_method="uniform")
    plan = plan_memory(layout, sample(), schedule="1f1b", n_microbatches=4, optimizer_states=2)
    static = estimate_stage_memory(layout, optimizer_states=2)
    assert [stage.microbatches_in_flight for stage in plan.stages] == [2, 1]
    for planned, plain in zip(plan.stages, static, strict=True):
        assert plain.activation_bytes == 0
        assert plain.peak_bytes == plain.total_bytes
        assert planned.total_bytes == plain.total_bytes
        assert planned.activation_bytes == planned.microbatches_in_flight * BLOCK_SAVED
        assert planned.peak_bytes == planned.total_bytes + planned.activation_bytes
    assert plan.limiting_stage == 0
    assert plan.rank_peak_bytes == tuple(stage.peak_bytes for stage in plan.stages)


def test_estimate_stage_memory_takes_the_plan_arguments_together() -> None:
    layout = plan_pipeline(block() * 2, num_stages=2, partition_method="uniform")
    stages = estimate_stage_memory(
        layout, optimizer_states=2, sample=sample(), schedule="gpipe", n_microbatches=3
    )
    assert [stage.microbatches_in_flight for stage in stages] == [3, 3]
    with pytest.raises(ValueError, match="pass all three"):
        estimate_stage_memory(layout, optimizer_states=2, sample=sample())


def test_a_rank_with_two_stages_peaks_along_its_own_order() -> None:
    layout = plan_pipeline(
        block() * 4,
        num_stages=2,
        stages_per_rank=2,
        stage_placement="v",
        partition_method="uniform",
    )
    plan = plan_memory(
        layout, sample(), schedule="zbvzerobubble", n_microbatches=4, optimizer_states=0
    )
    for rank in range(2):
        held = layout.stages_of(rank)
        activations = plan.rank_peak_bytes[rank] - sum(plan.stages[s].total_bytes for s in held)
        assert 0 < activations <= sum(plan.stages[s].activation_bytes for s in held)


def test_a_schedule_that_places_stages_otherwise_is_refused() -> None:
    layout = plan_pipeline(block() * 4, num_stages=2, stages_per_rank=2, partition_method="uniform")
    with pytest.raises(ValueError, match="stage_placement='v'"):
        plan_memory(
            layout, sample(), schedule="zbvzerobubble", n_microbatches=4, optimizer_states=2
        )


def test_the_counter_frees_everything_after_torchs_split_backward() -> None:
    # A saved output held with its grad_fn would keep its node alive after I and W (a cycle
    # only a full backward breaks): the bench would then see bytes that are long gone.
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    layers = torch.nn.Sequential(*(spec.build() for spec in block() * 2))
    counter = SavedTensorCounter([*layers.parameters()])
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    with counter.hooks():
        y = layers(x)
    # The blocks share one tensor: the first's last output is the second's input.
    saved = 2 * BLOCK_SAVED - FLOAT * ROWS * WIDTH
    assert counter.total_live_bytes == saved
    _, groups = stage_backward_input([y], [torch.ones_like(y)], [x], layers.parameters())
    # I drops the last Tanh's output; the Linears' nodes, and all below them, wait for W.
    assert counter.total_live_bytes == saved - FLOAT * ROWS * WIDTH
    stage_backward_weight(layers.parameters(), groups)
    del groups
    assert counter.total_live_bytes == 0


def test_a_region_saved_by_two_groups_counts_in_each_and_once_in_total() -> None:
    counter = SavedTensorCounter()
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    with counter.hooks():
        counter.group = 0
        y = x.tanh()  # saves its output
        counter.group = 1
        leaf = y.detach().requires_grad_()  # the next stage's input: the same storage
        z = leaf * leaf  # saves it (twice: once counted)
        del leaf
    size = FLOAT * ROWS * WIDTH
    assert counter.live_bytes == {0: size, 1: size}
    assert counter.total_live_bytes == size
    del y
    assert counter.total_live_bytes == size  # group 1 still holds it
    del z
    assert counter.total_live_bytes == 0


def test_the_input_pass_keeps_what_the_weight_pass_needs() -> None:
    layout = plan_pipeline(block() * 2, num_stages=2, partition_method="uniform")
    found = stage_activations(
        layout,
        sample(),
        loss_fn=torch.nn.functional.mse_loss,
        labels=sample(),
        split_backward=True,
    )
    # Stage 0's I computes nothing (torch runs its whole backward at W); the last stage's I
    # frees its last Tanh's output (which the loss saved too) and the loss's target.
    assert [stage.after_input_bytes for stage in found] == [
        BLOCK_SAVED,
        BLOCK_SAVED - FLOAT * ROWS * WIDTH,
    ]


def test_a_zero_bubble_plan_counts_the_input_pass_release() -> None:
    layout = plan_pipeline(block() * 4, num_stages=2, stages_per_rank=2, partition_method="uniform")
    plan = plan_memory(
        layout,
        sample(),
        schedule="interleavedzerobubble",
        n_microbatches=4,
        optimizer_states=0,
        loss_fn=torch.nn.functional.mse_loss,
        labels=sample(),
    )
    saved, target = BLOCK_SAVED, FLOAT * ROWS * WIDTH
    after = saved - FLOAT * ROWS * WIDTH
    # torch's order: rank 1 peaks on stage 1 with 3 micro-batches whole and 1 past I; stage 3
    # holds one whole (with the loss's target) and one past I. Measured equal in a real step
    # (tools/bench_memory.py).
    assert [(s.microbatches_in_flight, s.microbatches_after_input_pass) for s in plan.stages] == [
        (4, 0),
        (4, 1),
        (2, 0),
        (2, 1),
    ]
    assert [s.activation_bytes for s in plan.stages] == [
        4 * saved,
        3 * saved + after,
        2 * saved,
        saved + target + after,
    ]
