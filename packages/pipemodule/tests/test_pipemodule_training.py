"""Training through torch.distributed.pipelining equals training the same layers in one process."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812

from pipemodule import (
    PipelineModule,
    PipelineTrainer,
    build_schedule,
    clip_grad_norm_,
    count_parameters,
)
from pipemodule.examples import gpt_layers
from pipetopo.testing import spawn_ranks, world_of_one

VOCAB, HIDDEN, DEPTH = 16, 8, 2  # 5 layers
BATCH, SEQ, STEPS, LR, MAX_NORM = 8, 6, 4, 0.05, 0.5


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ + 1), generator=generator)
    return [(step[:, :-1], step[:, 1:]) for step in tokens]


def _train_pipeline(num_stages: int, schedule: str, n_microbatches: int) -> dict[str, Any]:
    torch.manual_seed(0)
    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=num_stages, loss_fn=_loss, device="cpu"
    )
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    trainer = PipelineTrainer(
        module, optimizer, n_microbatches=n_microbatches, schedule=schedule, max_grad_norm=MAX_NORM
    )
    grid = module.mpu()
    replicas, replica = grid.get_data_parallel_world_size(), grid.get_data_parallel_id()
    share = BATCH // replicas
    losses, norms, tied = [], [], []
    for inputs, targets in _batches():
        mine = slice(replica * share, (replica + 1) * share)
        losses.append(trainer.train_step(inputs[mine], targets[mine]))
        norms.append(trainer.last_grad_norm)
        if "embed" in module.tied_modules:
            weight = module.tied_modules["embed"].weight
            assert isinstance(weight, torch.Tensor)
            tied.append(weight.detach().clone())
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {
        "stage": module.stage_id,
        "replica": replica,
        "losses": losses,
        "norms": norms,
        "tied": tied,
        "state": state,
    }


def _train_in_one_process() -> dict[str, Any]:
    """The reference: the same layers, whole batches, plain autograd and torch's clipping."""
    torch.manual_seed(0)
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=1, device="cpu")
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
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
    return result


@pytest.mark.parametrize(
    ("num_stages", "schedule", "n_microbatches"),
    [(2, "1f1b", 2), (4, "1f1b", 4), (4, "gpipe", 2)],
    ids=["pipe2xdata2-1f1b", "pipe4-1f1b", "pipe4-gpipe"],
)
def test_pipeline_training_matches_one_process(
    reference: dict[str, Any], num_stages: int, schedule: str, n_microbatches: int
) -> None:
    results = spawn_ranks(_train_pipeline, 4, num_stages, schedule, n_microbatches)
    # The reference norms exceed MAX_NORM, so every step was clipped: the layouts agree only if
    # the norm covers every stage and replica, with the tied weight counted once.
    assert min(reference["norms"]) > MAX_NORM
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        torch.testing.assert_close(result["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["norms"], reference["norms"], rtol=1e-5, atol=1e-6)
        if result["replica"] == 0:
            merged.update(result["state"])
    assert merged.keys() == reference["state"].keys()
    for name, value in reference["state"].items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    first = next(r for r in results if r["stage"] == 0 and r["replica"] == 0)
    last = next(r for r in results if r["stage"] == num_stages - 1 and r["replica"] == 0)
    for step, (head, tail) in enumerate(zip(first["tied"], last["tied"], strict=True)):
        assert torch.equal(head, tail), f"tied copies differ after step {step}"


def _norm_of_all_ones_gradients() -> float:
    torch.manual_seed(0)
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=2, device="cpu")
    for parameter in module.parameters():
        parameter.grad = torch.ones_like(parameter)
    return clip_grad_norm_(module, 1e9)


def test_clipping_norm_counts_each_tied_weight_once() -> None:
    # With every gradient entry 1 the norm is sqrt(number of distinct parameters): the
    # embedding held by both stages must count once.
    distinct = count_parameters(gpt_layers(VOCAB, HIDDEN, DEPTH))
    for norm in spawn_ranks(_norm_of_all_ones_gradients, 2):
        assert norm == pytest.approx(distinct**0.5)


def test_bad_training_arguments_are_refused_before_any_step() -> None:
    with world_of_one():
        module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=1, device="cpu")
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        with pytest.raises(ValueError, match="schedule='zb'"):
            build_schedule(module, 2, "zb", _loss)
        with pytest.raises(ValueError, match="training needs a loss"):
            build_schedule(module, 2, "gpipe")
        with pytest.raises(ValueError, match="n_microbatches=0"):
            build_schedule(module, 0, "gpipe", _loss)
        with pytest.raises(ValueError, match="max_grad_norm=0"):
            PipelineTrainer(module, optimizer, n_microbatches=2, max_grad_norm=0, loss_fn=_loss)
        trainer = PipelineTrainer(module, optimizer, n_microbatches=3, loss_fn=_loss)
        inputs, targets = _batches()[0]
        with pytest.raises(ValueError, match="batch size 8"):
            trainer.train_step(inputs, targets)


def _default_group_references_held_while_training() -> int:
    """References to the default group that a live 2-stage model and its trainer hold."""
    world = dist.group.WORLD
    before = sys.getrefcount(world)
    torch.manual_seed(0)
    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=2, loss_fn=_loss, device="cpu"
    )
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    trainer = PipelineTrainer(module, optimizer, n_microbatches=2, max_grad_norm=MAX_NORM)
    inputs, targets = _batches()[0]
    trainer.train_step(inputs, targets)
    module.get_tied_weights_and_groups()
    return sys.getrefcount(world) - before


def test_a_live_model_and_trainer_do_not_keep_the_default_group_alive() -> None:
    # Two stages on two ranks: the pipe group and the tie group are the whole job. A script's
    # model and trainer live on after it calls destroy_process_group(); holding the default
    # group would free its backend only at interpreter shutdown, where gloo aborts the process.
    assert spawn_ranks(_default_group_references_held_while_training, 2) == [0, 0]
