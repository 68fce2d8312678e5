"""Stage shapes planned on meta: integer tensors between stages, shapes that change, bad batches."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812

from pipemodule import LayerSpec, PipelineModule, PipelineTrainer, plan_pipeline
from pipemodule._layout.shapes import describe_values, stage_shapes
from pipemodule.examples import FeedForwardBlock, gpt_layers
from pipetopo.testing import spawn_ranks

VOCAB, HIDDEN, BATCH, LR = 16, 8, 4, 0.5


class EmbedKeepIds(torch.nn.Module):
    """Stage 0's end: hidden states plus the integer ids, which the next stage indexes with."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(ids), ids


class AddPositionsById(torch.nn.Module):
    """Uses the received ids as indices: garbage ids would index out of range."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(VOCAB, HIDDEN)
        self.block = FeedForwardBlock(HIDDEN)

    def forward(
        self, inputs: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, ids = inputs
        return self.block(hidden + self.table(ids)), ids


def _head(inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return inputs[0]


def _layers() -> list[Any]:
    return [
        LayerSpec(EmbedKeepIds),
        LayerSpec(AddPositionsById),
        LayerSpec(AddPositionsById),
        _head,
        LayerSpec(torch.nn.Linear, HIDDEN, VOCAB),
    ]


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _batch(step: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(
        0, VOCAB, (BATCH, seq + 1), generator=torch.Generator().manual_seed(step)
    )
    return tokens[:, :-1], tokens[:, 1:]


SEQS = (16, 24, 16, 40)


def test_stage_shapes_follow_tuples_and_keep_integers() -> None:
    layout = plan_pipeline(_layers(), num_stages=2, partition_method="uniform")
    shapes = stage_shapes(layout, torch.zeros(2, 16, dtype=torch.int64))
    assert describe_values(shapes[0].inputs) == "(int64[2, 16])"
    assert describe_values(shapes[0].outputs) == "(float32[2, 16, 8], int64[2, 16])"
    assert [t.requires_grad for t in shapes[0].outputs] == [True, False]
    assert describe_values(shapes[1].outputs) == "(float32[2, 16, 16])"


def _train(dynamic: bool, seqs: tuple[int, ...]) -> list[float]:
    torch.manual_seed(0)
    module = PipelineModule(
        _layers(),
        num_stages=dist.get_world_size(),
        loss_fn=_loss,
        device="cpu",
        partition_method="uniform",
        dynamic_shape=dynamic,
    )
    trainer = PipelineTrainer(
        module, torch.optim.SGD(module.parameters(), lr=LR), n_microbatches=2, schedule="1f1b"
    )
    return [trainer.train_step(*_batch(step, seq)) for step, seq in enumerate(seqs)]


def test_changing_sequence_lengths_train_like_one_process() -> None:
    [reference] = spawn_ranks(_train, 1, True, SEQS)
    for losses in spawn_ranks(_train, 2, True, SEQS, timeout=120):
        torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-6)


def _train_fixed_then_change() -> tuple[str, float]:
    started = time.monotonic()
    try:
        _train(False, (16, 24))
    except ValueError as error:
        return str(error), time.monotonic() - started
    return "no error", 0.0


def test_a_shape_change_without_dynamic_shape_fails_on_every_rank() -> None:
    for message, _ in spawn_ranks(_train_fixed_then_change, 2, timeout=120):
        assert "the batch changed shape" in message
        assert "int64[2, 16]" in message
        assert "int64[2, 24]" in message
        assert "dynamic_shape=True" in message


def _per_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")


def _bad_batch(case: str, after_good_steps: bool) -> str:
    torch.manual_seed(0)
    loss = _per_token_loss if case == "a loss that is not a scalar" else _loss
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, 2), num_stages=2, loss_fn=loss, device="cpu")
    trainer = PipelineTrainer(module, torch.optim.SGD(module.parameters(), lr=LR), n_microbatches=2)
    if after_good_steps:
        # The batch check then takes its shortcut (nothing changed) before the bad batch.
        trainer.train_step(*_batch(1, 8))
        trainer.train_step(*_batch(2, 8))
    inputs, labels = _batch(0, 8)
    if case == "no labels on the last stage" and module.holds_last_stage:
        labels = None  # type: ignore[assignment]
    if case == "odd batch on the first stage" and module.holds_first_stage:
        inputs, labels = inputs[:3], labels[:3]
    if case == "float inputs":
        inputs = inputs.float()
    try:
        trainer.train_step(inputs, labels)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


_BAD_BATCHES = [
    ("no labels on the last stage", "labels=None on the rank holding the last stage"),
    ("odd batch on the first stage", "batch size 3, which does not split"),
    ("float inputs", "failed on the meta device"),
    ("a loss that is not a scalar", "it must return a scalar tensor"),
]
_LATER_BAD_BATCHES = [
    # After good steps the batch check has a shape to compare with: it speaks first.
    ("no labels on the last stage", "labels=None on the rank holding the last stage"),
    ("odd batch on the first stage", "batch size 3, which does not split"),
    ("float inputs", "the batch changed shape: micro-batches were int64[2, 8] and are now float32"),
]


@pytest.mark.parametrize(
    ("case", "expected", "after_good_steps"),
    [*((*bad, False) for bad in _BAD_BATCHES), *((*bad, True) for bad in _LATER_BAD_BATCHES)],
)
def test_a_bad_batch_fails_on_every_rank_at_once(
    case: str, expected: str, after_good_steps: bool
) -> None:
    started = time.monotonic()
    messages = spawn_ranks(_bad_batch, 2, case, after_good_steps, timeout=60)
    assert time.monotonic() - started < 40, "an error must not wait for a timeout"
    for message in messages:
        assert expected in message, message


def _count_batch_exchanges() -> tuple[int, int]:
    torch.manual_seed(0)
    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, 2), num_stages=2, loss_fn=_loss, device="cpu", dynamic_shape=True
    )
    trainer = PipelineTrainer(module, torch.optim.SGD(module.parameters(), lr=LR), n_microbatches=2)
    gathers = {"n": 0}
    original = torch.distributed.all_gather_object

    def counted(*args: Any, **kwargs: Any) -> None:
        gathers["n"] += 1
        original(*args, **kwargs)

    torch.distributed.all_gather_object = counted
    try:
        for step in range(3):
            trainer.train_step(*_batch(step, 8))
        same_shape = gathers["n"]
        trainer.train_step(*_batch(3, 12))  # longer sequences: a new shape, a full exchange
        return same_shape, gathers["n"] - same_shape
    finally:
        torch.distributed.all_gather_object = original


def test_the_batch_exchange_runs_only_when_a_batch_changes() -> None:
    for same_shape, changed in spawn_ranks(_count_batch_exchanges, 2, timeout=60):
        assert same_shape == 1  # the first step's exchange; later ones only compare
        assert changed == 1


def _train_into_overflow(limit: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    calls = {"n": 0}

    def exploding(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Steps 2 and 3 (micro-batches 3 to 6) overflow, as an fp16 loss would.
        calls["n"] += logits.device.type != "meta"  # planning calls it once on meta
        loss = _loss(logits, targets)
        return loss * float("inf") if 3 <= calls["n"] <= 6 else loss

    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, 2), num_stages=2, loss_fn=exploding, device="cpu"
    )
    trainer = PipelineTrainer(
        module,
        torch.optim.SGD(module.parameters(), lr=LR),
        n_microbatches=2,
        max_consecutive_skips=limit,
    )
    trainer.train_step(*_batch(0, 8))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        trainer.train_step(*_batch(1, 8))
        trainer.train_step(*_batch(2, 8))
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "skipped": trainer.skipped_steps}
    unchanged = all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    trainer.train_step(*_batch(3, 8))
    moved = not all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    return {
        "error": None,
        "skipped": trainer.skipped_steps,
        "steps": trainer.step_count,
        "unchanged": unchanged,
        "moved": moved,
    }


def test_non_finite_gradients_skip_the_step_on_every_rank() -> None:
    for result in spawn_ranks(_train_into_overflow, 2, None, timeout=120):
        assert result == {"error": None, "skipped": 2, "steps": 2, "unchanged": True, "moved": True}
    for result in spawn_ranks(_train_into_overflow, 2, 2, timeout=120):
        assert result["skipped"] == 2
        assert result["error"].startswith("NonFiniteGradientsError: the gradients were not finite")
