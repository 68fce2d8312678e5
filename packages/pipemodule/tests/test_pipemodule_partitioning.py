"""How PipelineModule chooses its stages: methods, profiling, the logged plan, bad plans."""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, ClassVar

import pytest
import torch

from pipemodule import LayerSpec, PipelineModule
from pipemodule.examples import gpt_layers
from pipepartition import Boundaries, Weights
from pipetopo.testing import fake_world, spawn_ranks, world_of_one


class SlowLayer(torch.nn.Module):
    """A layer whose forward takes far longer than its parameter count suggests."""

    alive: ClassVar[list[weakref.ref[SlowLayer]]] = []
    most_alive: ClassVar[int] = 0

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        SlowLayer.alive = [ref for ref in SlowLayer.alive if ref() is not None]
        SlowLayer.alive.append(weakref.ref(self))
        SlowLayer.most_alive = max(SlowLayer.most_alive, len(SlowLayer.alive))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        out: torch.Tensor = self.linear(x)
        return out


def _profiled_parts() -> tuple[list[int], int]:
    # Six slow layers, then six plain ones of the same size: by parameters they weigh the same,
    # by measured time the slow half is the whole cost.
    layers = [LayerSpec(SlowLayer, 8) for _ in range(6)]
    layers += [LayerSpec(torch.nn.Linear, 8, 8) for _ in range(6)]
    module = PipelineModule(
        layers,
        num_stages=2,
        partition_method="profile",
        profile_input=torch.randn(4, 8),
        device="cpu",
    )
    return module.parts, SlowLayer.most_alive


def test_profile_balances_measured_time_and_every_rank_gets_the_same_plan() -> None:
    (parts_0, most_alive_0), (parts_1, _) = spawn_ranks(_profiled_parts, 2)
    assert parts_0 == parts_1
    assert parts_0 == [0, 3, 12]
    # Rank 0 measured all twelve layers but never held two slow ones at once (the stage it
    # keeps holds three, built after profiling).
    assert most_alive_0 == 3


def _parts_by_method() -> dict[str, list[int]]:
    layers = gpt_layers(16, 8, 4)  # embed, 4 blocks, norm, head: 7 layers
    methods: dict[str, Any] = {
        "uniform": "uniform",
        "parameters": "parameters",
        "type": "type:feedforward",
        "boundaries": Boundaries((0, 2, 7)),
        "weights": Weights((1, 1, 1, 1, 1, 1, 30)),
    }
    return {
        name: PipelineModule(layers, num_stages=2, partition_method=method, device="cpu").parts
        for name, method in methods.items()
    }


def test_partition_methods_reach_the_stages() -> None:
    results = spawn_ranks(_parts_by_method, 2)
    assert results[0] == results[1]
    assert results[0] == {
        "uniform": [0, 4, 7],
        # embedding + blocks vs blocks + norm + head: the tied embedding counts at both ends.
        "parameters": [0, 3, 7],
        "type": [0, 3, 7],
        "boundaries": [0, 2, 7],
        "weights": [0, 6, 7],
    }


@pytest.mark.parametrize("method", ["parameters", "uniform", "type:feedforward"])
def test_the_first_rank_logs_the_plan_as_a_table(
    caplog: pytest.LogCaptureFixture, method: str
) -> None:
    with world_of_one(), caplog.at_level(logging.INFO, logger="pipemodule"):
        PipelineModule(gpt_layers(16, 8, 2), num_stages=1, partition_method=method, device="cpu")
    [record] = [r for r in caplog.records if "pipeline partition" in r.getMessage()]
    message = record.getMessage()
    assert "Embedding, 2\N{MULTIPLICATION SIGN}FeedForwardBlock, LayerNorm, Embedding" in message
    # Every method's table counts parameters: embedding 128 + 2 blocks of 552 + norm 16 + head.
    assert "1,376" in message
    assert "100.0%" in message


@pytest.mark.parametrize("rank", [0, 3])
def test_fewer_layers_than_stages_fails_before_any_collective(rank: int) -> None:
    # A simulated world cannot communicate: the error must come from the arguments alone.
    with (
        fake_world(4, rank),
        pytest.raises(ValueError, match=r"3 layers cannot fill 4 pipeline stages"),
    ):
        PipelineModule([LayerSpec(torch.nn.Linear, 2, 2) for _ in range(3)], num_stages=4)
