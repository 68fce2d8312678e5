"""Every torch schedule, with virtual stages and a tied embedding, equals one-process training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812

from pipemodule import (
    SCHEDULES,
    PipeDataParallelTopology,
    PipelineModule,
    PipelineTrainer,
    build_schedule,
    plan_pipeline,
)
from pipemodule.examples import gpt_layers
from pipetopo.testing import spawn_ranks, world_of_one

VOCAB, HIDDEN, DEPTH = 16, 8, 6  # 9 layers: enough for 4 ranks x 2 stages
BATCH, SEQ, STEPS, LR, MAX_NORM = 8, 4, 3, 0.5, 0.5

# (schedule, stages_per_rank, placement)
RUNS = [
    ("GPipe", 1, "loop"),
    ("1F1B", 1, "loop"),
    ("Interleaved1F1B", 2, "loop"),
    ("LoopedBFS", 2, "loop"),
    ("InterleavedZeroBubble", 2, "loop"),
    ("ZBVZeroBubble", 2, "v"),
    ("DualPipeV", 2, "v"),
]


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ + 1), generator=generator)
    return [(step[:, :-1], step[:, 1:]) for step in tokens]


def _train(pipe: int, schedule: str, per_rank: int, placement: str, m: int) -> dict[str, Any]:
    torch.manual_seed(0)
    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, DEPTH),
        topology=PipeDataParallelTopology(num_pp=pipe, num_dp=dist.get_world_size() // pipe),
        loss_fn=_loss,
        device="cpu",
        stages_per_rank=per_rank,
        stage_placement=placement,
    )
    # SGD: linear in the gradient, so summation-order noise stays at float precision (Adam
    # turns the noise of near-zero gradients into full-size steps).
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    trainer = PipelineTrainer(
        module, optimizer, n_microbatches=m, schedule=schedule, max_grad_norm=MAX_NORM
    )
    replicas, replica = module.grid.axis_size("data"), module.grid.axis_rank("data")
    share = BATCH // replicas
    losses, norms, tied = [], [], []
    for inputs, targets in _batches():
        mine = slice(replica * share, (replica + 1) * share)
        losses.append(trainer.train_step(inputs[mine], targets[mine]))
        norms.append(trainer.last_grad_norm)
        held = "embed" in module.tied_modules
        tied.append(
            module.get_parameter("tied_modules.embed.weight").detach().clone() if held else None
        )
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"replica": replica, "losses": losses, "norms": norms, "tied": tied, "state": state}


def _every_schedule(pipe: int, m: int) -> list[dict[str, Any]]:
    return [_train(pipe, name, per_rank, placement, m) for name, per_rank, placement in RUNS]


def _train_in_one_process() -> dict[str, Any]:
    torch.manual_seed(0)
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=1, device="cpu")
    # SGD: linear in the gradient, so summation-order noise stays at float precision (Adam
    # turns the noise of near-zero gradients into full-size steps).
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    losses, norms = [], []
    for inputs, targets in _batches():
        optimizer.zero_grad()
        loss = _loss(module(inputs), targets)
        torch.autograd.backward(loss)
        norms.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), MAX_NORM)))
        optimizer.step()
        losses.append(float(loss))
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"losses": losses, "norms": norms, "state": state}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    [result] = spawn_ranks(_train_in_one_process, 1)
    assert isinstance(result, dict)
    assert min(result["norms"]) > MAX_NORM, "every step must clip, or clipping goes untested"
    return result


@pytest.mark.parametrize(("pipe", "m"), [(4, 8), (2, 4)], ids=["pipe4", "pipe2xdata2"])
def test_every_schedule_trains_like_one_process(
    reference: dict[str, Any], pipe: int, m: int
) -> None:
    per_rank = spawn_ranks(_every_schedule, 4, pipe, m, timeout=600)
    for run, (name, _, placement) in enumerate(RUNS):
        results = [rank_results[run] for rank_results in per_rank]
        merged: dict[str, torch.Tensor] = {}
        for result in results:
            torch.testing.assert_close(
                result["losses"], reference["losses"], rtol=1e-5, atol=1e-6, msg=name
            )
            torch.testing.assert_close(
                result["norms"], reference["norms"], rtol=1e-5, atol=1e-6, msg=name
            )
            if result["replica"] == 0:
                merged.update(result["state"])
        assert merged.keys() == reference["state"].keys(), name
        for key, value in reference["state"].items():
            torch.testing.assert_close(
                merged[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}/{placement}: {key}"
            )
        copies = [r["tied"] for r in results if r["tied"][0] is not None]
        assert len(copies) >= 2 or placement == "v", name
        for step in range(STEPS):
            for other in copies[1:]:
                assert torch.equal(copies[0][step], other[step]), f"{name}: step {step}"


def test_v_placement_puts_the_embedding_and_head_on_one_rank() -> None:
    layout = plan_pipeline(
        gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=2, stages_per_rank=2, stage_placement="v"
    )
    assert layout.stages_of(0) == (0, 3)
    assert layout.stages_of(1) == (1, 2)
    assert layout.ties["embed"].stages == (0, 3)
    assert layout.ties["embed"].rank_sets == (), "one rank holds both: no group, one module"
    loop = plan_pipeline(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=2, stages_per_rank=2)
    assert loop.stages_of(0) == (0, 2)
    assert loop.ties["embed"].rank_sets == ((0, 1),)


def _mismatches() -> list[str]:
    messages = []
    with world_of_one():
        single = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=1, loss_fn=_loss)
        looped = PipelineModule(
            gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=1, loss_fn=_loss, stages_per_rank=2
        )
        cases: list[tuple[PipelineModule, object, int]] = [
            (looped, "1F1B", 4),
            (looped, "ZBVZeroBubble", 4),
            (single, "DualPipeV", 4),
            (single, 3, 4),
            (single, "PipelineScheduleMulti", 4),
        ]
        for module, name, m in cases:
            try:
                build_schedule(module, m, name)  # type: ignore[arg-type]
            except (TypeError, ValueError) as error:
                messages.append(f"{type(error).__name__}: {error}")
    return messages


def test_a_schedule_that_does_not_fit_says_what_it_needs() -> None:
    messages = _mismatches()
    assert len(messages) == 5
    assert "runs one stage per rank" in messages[0]
    assert "stages_per_rank=1" in messages[0]
    assert "stage_placement='v'" in messages[1]
    assert "stages_per_rank=2 and stage_placement='v'" in messages[2]
    assert messages[3].startswith("TypeError: schedule=3")
    assert "not known" in messages[4]


def test_interleaved_micro_batches_must_fill_rounds() -> None:
    layout = plan_pipeline(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=2, stages_per_rank=2)
    assert layout.num_stages == 4


def test_schedules_are_torchs_own() -> None:
    assert {cls.__name__ for cls in SCHEDULES.values()} == {
        "ScheduleGPipe",
        "Schedule1F1B",
        "ScheduleInterleaved1F1B",
        "ScheduleLoopedBFS",
        "ScheduleInterleavedZeroBubble",
        "ScheduleZBVZeroBubble",
        "ScheduleDualPipeV",
    }


def _state_of(pipe: int, per_rank: int, placement: str, load_from: str | None) -> dict[str, Any]:
    torch.manual_seed(0 if load_from is None else 1)  # a reload starts from other weights
    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, DEPTH),
        topology=PipeDataParallelTopology(num_pp=pipe, num_dp=dist.get_world_size() // pipe),
        device="cpu",
        stages_per_rank=per_rank,
        stage_placement=placement,
    )
    if load_from is not None:
        module.load_state_dir(load_from)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _save_virtual(directory: str) -> None:
    torch.manual_seed(0)
    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=2, device="cpu", stages_per_rank=2
    )
    module.save_state_dict(directory)


def _merged(states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        for key, value in state.items():
            if key in merged:
                assert torch.equal(merged[key], value), f"copies of {key} differ"
            merged[key] = value
    return merged


def test_initial_weights_and_checkpoints_do_not_depend_on_the_layout(tmp_path: Any) -> None:
    [one] = spawn_ranks(_state_of, 1, 1, 1, "loop", None)
    for pipe, per_rank, placement in [(4, 1, "loop"), (2, 2, "loop"), (4, 2, "v")]:
        states = spawn_ranks(_state_of, 4, pipe, per_rank, placement, None)
        merged = _merged(states)
        assert merged.keys() == one.keys()
        for key, value in one.items():
            assert torch.equal(merged[key], value), f"{pipe}x{per_rank} {placement}: {key}"
    # Saved by 2 ranks x 2 stages (loop), loaded by 4 ranks x 2 stages (v) and by one process.
    spawn_ranks(_save_virtual, 2, str(tmp_path))
    for world, pipe, per_rank, placement in [(4, 4, 2, "v"), (1, 1, 1, "loop")]:
        states = spawn_ranks(_state_of, world, pipe, per_rank, placement, str(tmp_path))
        merged = _merged(states)
        for key, value in one.items():
            assert torch.equal(merged[key], value), f"reloaded {pipe}x{per_rank}: {key}"
