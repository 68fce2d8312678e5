"""stage_memory_limits with a TrainingStep cap each stage's training peak, not its parameters."""

from __future__ import annotations

import pytest
import torch

from pipemodule import PipelineLayout, PipelineModule, TrainingStep, plan_memory, plan_pipeline
from pipemodule._cli.byte_sizes import parse_bytes
from pipemodule.examples import gpt_layers
from pipespec import Layer
from pipetopo.testing import world_of_one

IDS = torch.empty(4, 256, dtype=torch.long, device="meta")


def layers() -> list[Layer]:
    return list(gpt_layers(vocab_size=1000, hidden=64, depth=8))


def peaks(layout: PipelineLayout, schedule: str, m: int, interval: int = 0) -> list[int]:
    plan = plan_memory(
        layout,
        IDS,
        schedule=schedule,
        n_microbatches=m,
        optimizer_states=2,
        activation_checkpoint_interval=interval,
    )
    return [stage.peak_bytes for stage in plan.stages]


@pytest.mark.parametrize(("schedule", "fraction"), [("1f1b", 0.8), ("gpipe", 0.9)])
def test_a_limit_below_the_unlimited_peak_changes_the_partition_and_every_peak_fits(
    schedule: str, fraction: float
) -> None:
    free = plan_pipeline(layers(), num_stages=4)
    limit = int(max(peaks(free, schedule, 8)) * fraction)
    step = TrainingStep(IDS, schedule, 8)
    limited = plan_pipeline(
        layers(), num_stages=4, stage_memory_limits=[limit] * 4, training_step=step
    )
    assert limited.plan.boundaries != free.plan.boundaries
    assert max(peaks(limited, schedule, 8)) <= limit


def test_the_same_limit_on_parameters_alone_would_not_move_anything() -> None:
    free = plan_pipeline(layers(), num_stages=4)
    limit = int(max(peaks(free, "1f1b", 8)) * 0.8)
    # Without a TrainingStep a limit means parameter bytes, far below it: nothing moves.
    assert plan_pipeline(layers(), num_stages=4, stage_memory_limits=[limit] * 4).plan == free.plan


def test_with_checkpointing_the_chosen_partition_fits_by_the_exact_count() -> None:
    free = plan_pipeline(layers(), num_stages=4)
    # Checkpointing is searched with each layer as a chunk of its own, which overcounts: a
    # limit some way above the unlimited peak is found; whatever is returned fits exactly.
    limit = int(max(peaks(free, "gpipe", 8, interval=2)) * 1.3)
    step = TrainingStep(IDS, "gpipe", 8, activation_checkpoint_interval=2)
    limited = plan_pipeline(
        layers(), num_stages=4, stage_memory_limits=[limit] * 4, training_step=step
    )
    assert max(peaks(limited, "gpipe", 8, interval=2)) <= limit


def test_no_partition_fits_raises_with_the_stage_and_the_least_limit_that_fits() -> None:
    step = TrainingStep(IDS, "1f1b", 8)
    with pytest.raises(
        ValueError, match=r"needs .* \(([\d,]+) bytes\) more on stage (\d)"
    ) as raised:
        plan_pipeline(
            layers(), num_stages=4, stage_memory_limits=[3 * 2**20] * 4, training_step=step
        )
    message = str(raised.value)
    assert "what would fit: every limit raised by" in message
    assert "more stages" in message
    assert "activation checkpointing" in message
    # The least raise it names really is enough (the model errs on the safe side).
    raise_by = int(
        message.split("every limit raised by ")[1].split("(")[1].split(" bytes")[0].replace(",", "")
    )
    fits = plan_pipeline(
        layers(), num_stages=4, stage_memory_limits=[3 * 2**20 + raise_by] * 4, training_step=step
    )
    assert max(peaks(fits, "1f1b", 8)) <= 3 * 2**20 + raise_by


def test_training_step_without_limits_or_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ValueError, match="training_step only tells stage_memory_limits"):
        plan_pipeline(layers(), num_stages=2, training_step=TrainingStep(IDS, "1f1b", 4))
    with pytest.raises(TypeError, match=r"pass a pipemodule\.TrainingStep"):
        plan_pipeline(
            layers(),
            num_stages=2,
            stage_memory_limits=[1e9] * 2,
            training_step="1f1b",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="n_microbatches"):
        TrainingStep(IDS, "1f1b", 0)


@pytest.mark.parametrize(
    ("text", "count"),
    [("80GiB", 80 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1000", 1000),
     ("0.1KiB", 102)],
)  # fmt: skip
def test_byte_sizes_people_write(text: str, count: int) -> None:
    assert parse_bytes(text) == count


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "80 parsecs", "0"])
def test_byte_sizes_that_are_not_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match=r"byte size|at least 1 byte"):
        parse_bytes(text)


def test_pipeline_module_caps_the_peak_of_its_own_checkpointing() -> None:
    step = TrainingStep(IDS, "1f1b", 8)
    with world_of_one(), pytest.raises(ValueError, match=r"training peak .* on stage 0"):
        PipelineModule(
            layers(), num_stages=1, stage_memory_limits=[2**20], training_step=step, device="cpu"
        )
    other = TrainingStep(IDS, "1f1b", 8, activation_checkpoint_interval=3)
    with world_of_one(), pytest.raises(ValueError, match=r"checkpoints every 1 layers"):
        PipelineModule(
            layers(),
            num_stages=1,
            activation_checkpoint_interval=1,
            stage_memory_limits=[2**30],
            training_step=other,
            device="cpu",
        )
    with world_of_one():
        module = PipelineModule(
            layers(), num_stages=1, stage_memory_limits=[2**30], training_step=step, device="cpu"
        )
    assert list(module.layout.plan.boundaries) == [0, 11]
