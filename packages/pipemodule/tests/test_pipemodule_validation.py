"""Argument validation: every bad configuration raises locally, naming the value and the fix."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pipemodule import LayerSpec, PipelineModule, TiedLayerSpec
from pipepartition import Boundaries
from pipetopo import PipeDataParallelTopology, ProcessTopology
from pipetopo.testing import world_of_one


@pytest.fixture(autouse=True, scope="module")
def _world() -> Iterator[None]:
    with world_of_one():
        yield


def linears(n: int) -> list[LayerSpec]:
    return [LayerSpec(torch.nn.Linear, 4, 4) for _ in range(n)]


def test_world_of_one_builds_every_layer_on_cpu() -> None:
    module = PipelineModule(linears(3), num_stages=1, device="cpu")
    assert module.parts == [0, 3]
    assert module.stage_id == 0
    assert sorted(name for name, _ in module.named_parameters()) == [
        "0.bias",
        "0.weight",
        "1.bias",
        "1.weight",
        "2.bias",
        "2.weight",
    ]
    out = module(torch.ones(2, 4))
    assert out.shape == (2, 4)


def test_neither_num_stages_nor_topology() -> None:
    with pytest.raises(ValueError, match="num_stages"):
        PipelineModule(linears(2), device="cpu")


def test_num_stages_must_divide_world() -> None:
    with pytest.raises(ValueError, match=r"num_stages=2 does not divide the world size 1"):
        PipelineModule(linears(2), num_stages=2, device="cpu")


def test_topology_contradicting_num_stages() -> None:
    topology = PipeDataParallelTopology(num_pp=1, num_dp=1)
    with pytest.raises(ValueError, match="contradicts"):
        PipelineModule(linears(2), num_stages=3, topology=topology, device="cpu")


def test_topology_world_size_mismatch() -> None:
    with pytest.raises(ValueError, match="has 4 ranks but the process group has 1"):
        PipelineModule(linears(8), topology=PipeDataParallelTopology(2, 2), device="cpu")


def test_topology_without_pipe_axis() -> None:
    with pytest.raises(ValueError, match="no 'pipe' axis"):
        PipelineModule(linears(2), topology=ProcessTopology(["data"], [1]), device="cpu")


def test_empty_layer_list() -> None:
    with pytest.raises(ValueError, match="empty"):
        PipelineModule([], num_stages=1, device="cpu")


def test_bad_layer_types() -> None:
    with pytest.raises(TypeError, match=r"layer 1 is the class Linear"):
        PipelineModule([torch.nn.ReLU(), torch.nn.Linear], num_stages=1, device="cpu")
    with pytest.raises(TypeError, match=r"layer 0 is 3"):
        PipelineModule([3], num_stages=1, device="cpu")  # type: ignore[list-item]


def test_empty_stage_from_explicit_boundaries() -> None:
    with pytest.raises(ValueError, match="stage"):
        PipelineModule(linears(2), num_stages=1, partition_method=Boundaries((0, 0)), device="cpu")


def test_unknown_partition_method_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="uniform"):
        PipelineModule(linears(2), num_stages=1, partition_method="balanced", device="cpu")


def test_profile_needs_sample_input() -> None:
    with pytest.raises(ValueError, match="profile_input"):
        PipelineModule(linears(2), num_stages=1, partition_method="profile", device="cpu")


def test_negative_checkpoint_interval() -> None:
    with pytest.raises(ValueError, match="activation_checkpoint_interval=-1"):
        PipelineModule(linears(2), num_stages=1, activation_checkpoint_interval=-1, device="cpu")
    module = PipelineModule(linears(2), num_stages=1, device="cpu")
    with pytest.raises(ValueError, match="interval=-2"):
        module.set_checkpoint_interval(-2)


def test_tied_occurrences_must_agree() -> None:
    layers = [
        TiedLayerSpec("embed", torch.nn.Embedding, 10, 4),
        TiedLayerSpec("embed", torch.nn.Embedding, 10, 8),
    ]
    with pytest.raises(ValueError, match=r"layers 0 and 1"):
        PipelineModule(layers, num_stages=1, device="cpu")


def test_nested_pipeline_module_rejected() -> None:
    inner = PipelineModule(linears(1), num_stages=1, device="cpu")
    with pytest.raises(ValueError, match="nested"):
        PipelineModule([inner], num_stages=1, device="cpu")


def test_stage_owner_out_of_range() -> None:
    module = PipelineModule(linears(2), num_stages=1, device="cpu")
    assert module.stage_owner(1) == 0
    with pytest.raises(ValueError, match="layer_idx=2"):
        module.stage_owner(2)


def test_meta_device_rejected() -> None:
    with pytest.raises(ValueError, match="meta"):
        PipelineModule(linears(1), num_stages=1, device="meta")
