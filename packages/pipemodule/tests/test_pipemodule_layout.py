"""plan_pipeline: the layout every rank computes alone, and the one PipelineModule is built from."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipemodule import (
    LayerSpec,
    PipeDataParallelTopology,
    PipelineModule,
    TiedLayerSpec,
    estimate_stage_memory,
    plan_pipeline,
)
from pipemodule.examples import gpt_layers, tied_unembed
from pipetopo.testing import world_of_one


def test_a_layout_needs_no_process_group_and_builds_nothing() -> None:
    assert not dist.is_initialized()
    built: list[int] = []

    class Counting(torch.nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 4)
            built.append(self.weight.device.type == "meta")

    layout = plan_pipeline([LayerSpec(Counting) for _ in range(4)], num_stages=2)
    assert layout.layers_of(0) == range(0, 2)
    assert built == [True], "described once, on meta, as one distinct spec"
    plan_pipeline([LayerSpec(Counting) for _ in range(4)], 2, partition_method="uniform")
    assert built == [True], "'uniform' describes nothing"


def test_ties_know_their_layers_stages_owner_and_groups() -> None:
    layers = gpt_layers(vocab_size=50, hidden=8, depth=4)
    layout = plan_pipeline(layers, topology=PipeDataParallelTopology(num_pp=2, num_dp=2))
    tie = layout.ties["embed"]
    assert tie.layer_indices == (0, 6)
    assert tie.stages == (0, 1)
    assert tie.owner_stage == 0
    assert tie.first_layer == 0
    # One group per pipeline replica: topology ranks pipe * 2 + data.
    assert tie.rank_sets == ((0, 2), (1, 3))
    single = plan_pipeline(layers, num_stages=1).ties["embed"]
    assert single.stages == (0,)
    assert single.rank_sets == (), "a tie held by one stage needs no group"


def test_a_stage_holding_both_ends_of_a_tie_holds_one_module() -> None:
    layout = plan_pipeline(gpt_layers(vocab_size=50, hidden=8, depth=2), num_stages=1)
    assert layout.held_layers(0) == (0, 1, 2, 3), "the LM head reuses layer 0's embedding"
    (memory,) = estimate_stage_memory(layout, optimizer_states=2)
    assert memory.parameters == layout.parameter_count()
    assert memory.optimizer_bytes == 2 * memory.gradient_bytes == 2 * memory.parameter_bytes


def test_same_inputs_same_layout_and_fingerprint() -> None:
    first = plan_pipeline(gpt_layers(depth=6), num_stages=4)
    second = plan_pipeline(gpt_layers(depth=6), num_stages=4)
    assert first == second
    assert first.fingerprint() == second.fingerprint()
    other = plan_pipeline(gpt_layers(depth=6), num_stages=4, partition_method="uniform")
    assert other.fingerprint() != first.fingerprint()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_stages": "2"}, TypeError, "num_stages='2'"),
        ({"num_stages": 0}, ValueError, "num_stages=0"),
        ({"num_stages": 3, "world_size": 4}, ValueError, "does not divide the world size 4"),
        ({"num_stages": 20}, ValueError, "7 layers cannot fill 20 pipeline stages"),
        (
            {"num_stages": 2, "stage_speeds": [1.0]},
            ValueError,
            "stage_speeds has 1 entry but",
        ),
        ({"num_stages": 2, "partition_method": "profile"}, ValueError, "profile="),
        ({"num_stages": 2, "partition_method": "bogus"}, ValueError, "uniform"),
        ({}, ValueError, "give num_stages"),
    ],
)
def test_bad_arguments_name_the_value(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        plan_pipeline(gpt_layers(depth=4), **kwargs)  # type: ignore[arg-type]


def test_mismatched_tie_occurrences_are_refused_before_planning() -> None:
    layers = [
        TiedLayerSpec("embed", torch.nn.Embedding, 10, 4),
        TiedLayerSpec("embed", torch.nn.Embedding, 10, 8, forward_fn=tied_unembed),
    ]
    with pytest.raises(ValueError, match=r"tie key 'embed' is used by layers 0 and 1"):
        plan_pipeline(layers, num_stages=1)


def test_a_module_is_built_from_the_layout_plan_pipeline_computes() -> None:
    layers = gpt_layers(vocab_size=50, hidden=8, depth=4)
    with world_of_one():
        module = PipelineModule(layers, num_stages=1, device="cpu")
    assert module.layout == plan_pipeline(layers, num_stages=1)
    assert module.plan == module.layout.plan
    assert list(module.local_layer_indices) == list(module.layout.layers_of(0))
