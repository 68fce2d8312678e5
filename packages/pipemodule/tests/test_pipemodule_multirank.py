"""Pipelines over several processes (gloo on CPU): stages, ties, agreement, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist

from pipemodule import LayerSpec, PipelineModule, PipelineRankError
from pipemodule.examples import gpt_layers
from pipetopo.testing import spawn_ranks

VOCAB, HIDDEN, DEPTH = 32, 8, 5  # 8 layers


def _tied_weight(module: PipelineModule, key: str) -> torch.Tensor:
    weight = module.tied_modules[key].weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _local_state(module: PipelineModule) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def _init_states(num_stages: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=num_stages, device="cpu")
    return _local_state(module) if module.mpu().get_data_parallel_id() == 0 else {}


def test_initial_weights_do_not_depend_on_the_number_of_stages() -> None:
    by_stages = {}
    for stages in (1, 2, 4):
        merged: dict[str, torch.Tensor] = {}
        for state in spawn_ranks(_init_states, 4, stages):
            merged.update(state)
        by_stages[stages] = merged
    assert by_stages[1].keys() == by_stages[4].keys() == by_stages[2].keys()
    for name, value in by_stages[1].items():
        assert torch.equal(value, by_stages[2][name]), name
        assert torch.equal(value, by_stages[4][name]), name


def _forward_through_stages(num_stages: int) -> torch.Tensor | None:
    torch.manual_seed(0)
    layers = gpt_layers(VOCAB, HIDDEN, DEPTH)
    module = PipelineModule(layers, num_stages=num_stages, partition_method="uniform", device="cpu")
    grid = module.mpu()
    tokens = torch.arange(12).reshape(2, 6) % VOCAB
    out: torch.Tensor
    if grid.is_first_stage:
        out = module(tokens)
    else:
        received = torch.empty(2, 6, HIDDEN)
        dist.recv(received, src=grid.stage_to_global(module.stage_id - 1))
        out = module(received)
    if not grid.is_last_stage:
        dist.send(out.detach().contiguous(), dst=grid.stage_to_global(module.stage_id + 1))
        return None
    return out.detach()


def _single_process_reference() -> torch.Tensor:
    # Every weight of the 4-stage run, gathered, loaded into one sequential model.
    states: dict[str, torch.Tensor] = {}
    for state in spawn_ranks(_init_states, 2, 1):
        states.update(state)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    embedding.weight.data.copy_(states["tied_modules.embed.weight"])
    sequential = torch.nn.Sequential()
    for index in range(1, DEPTH + 2):
        spec = gpt_layers(VOCAB, HIDDEN, DEPTH)[index]
        assert isinstance(spec, LayerSpec)
        layer = spec.build()
        layer.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in states.items() if k.split(".")[0] == str(index)}
        )
        sequential.append(layer)
    tokens = torch.arange(12).reshape(2, 6) % VOCAB
    with torch.no_grad():
        reference: torch.Tensor = sequential(embedding(tokens)) @ embedding.weight.t()
    return reference


@pytest.mark.parametrize("num_stages", [2, 4])
def test_stage_by_stage_forward_equals_one_process(num_stages: int) -> None:
    outputs = [
        out
        for out in spawn_ranks(_forward_through_stages, num_stages, num_stages)
        if out is not None
    ]
    assert len(outputs) == 1
    torch.testing.assert_close(outputs[0], _single_process_reference())


def _ties_after_step() -> tuple[int, list[torch.Tensor]]:
    torch.manual_seed(0)
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=4, device="cpu")
    weight = _tied_weight(module, "embed") if "embed" in module.tied_modules else None
    snapshots = [] if weight is None else [weight.detach().clone()]
    if weight is not None:
        # Each copy gets a different local gradient, as the two ends of a real pipeline do.
        weight.grad = torch.full_like(weight, float(module.stage_id + 1))
    module.allreduce_tied_weight_gradients()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    if weight is not None:
        snapshots.append(weight.detach().clone())
    return module.stage_id, snapshots


def test_tied_copies_are_equal_after_init_and_after_a_step() -> None:
    results = dict(spawn_ranks(_ties_after_step, 4))
    first, last = results[0], results[3]
    assert results[1] == [], "middle stages hold no tied copy"
    assert results[2] == [], "middle stages hold no tied copy"
    assert torch.equal(first[0], last[0]), "equal after construction"
    assert torch.equal(first[1], last[1]), "equal after an optimizer step"
    # The summed gradient is 1 + 4, so each copy moved by lr * 5.
    torch.testing.assert_close(first[0] - first[1], torch.full_like(first[0], 0.5))


def _construct_with_rank_dependent_layers() -> str:
    hidden = 8 if dist.get_rank() != 2 else 16
    try:
        PipelineModule(
            [LayerSpec(torch.nn.Linear, hidden, hidden) for _ in range(4)],
            num_stages=4,
            device="cpu",
        )
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_ranks_that_disagree_all_raise_naming_the_layer() -> None:
    messages = spawn_ranks(_construct_with_rank_dependent_layers, 4, timeout=60)
    for message in messages:
        assert "rank 2" in message, message
        assert "layer 0 differs" in message, message


class Probe(torch.nn.Module):
    """Records, per process, every construction that allocated real memory."""

    real_builds: ClassVar[list[int]] = []

    def __init__(self, index: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        if not self.linear.weight.is_meta:
            Probe.real_builds.append(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


def _real_builds(method: str) -> tuple[int, list[int]]:
    Probe.real_builds = []
    module = PipelineModule(
        [LayerSpec(Probe, i) for i in range(8)], num_stages=4, partition_method=method, device="cpu"
    )
    return module.stage_id, list(Probe.real_builds)


@pytest.mark.parametrize("method", ["parameters", "uniform"])
def test_layers_of_other_stages_are_never_built(method: str) -> None:
    for stage, built in spawn_ranks(_real_builds, 4, method):
        assert built == [2 * stage, 2 * stage + 1]


def _save(directory: str) -> None:
    torch.manual_seed(0)
    PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=4, device="cpu").save_state_dict(
        directory
    )


def _load(directory: str, num_stages: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(99)  # different initial weights: everything must come from the files
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=num_stages, device="cpu")
    module.load_state_dir(directory)
    return _local_state(module)


def test_checkpoint_of_four_stages_loads_with_two_and_one(tmp_path: Path) -> None:
    spawn_ranks(_save, 4, str(tmp_path))
    reference: dict[str, torch.Tensor] = {}
    for state in spawn_ranks(_init_states, 4, 4):
        reference.update(state)
    for stages in (2, 1):
        loaded: dict[str, torch.Tensor] = {}
        for state in spawn_ranks(_load, 2, str(tmp_path), stages):
            loaded.update(state)
        assert loaded.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(loaded[name], value), (stages, name)


def _load_missing(directory: str) -> str:
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=2, device="cpu")
    try:
        module.load_state_dir(directory)
    except (FileNotFoundError, PipelineRankError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_a_missing_file_raises_on_every_rank_instead_of_hanging(tmp_path: Path) -> None:
    spawn_ranks(_save, 4, str(tmp_path))
    (tmp_path / "layer_05-model_states.pt").unlink()
    first, second = spawn_ranks(_load_missing, 2, str(tmp_path), timeout=60)
    assert first.startswith("PipelineRankError")
    assert "layer 5" in first
    assert second.startswith("FileNotFoundError")
    assert "layer_05-model_states.pt" in second


def _three_d(directory: str) -> dict[str, Any]:
    from pipetopo import PipeModelDataParallelTopology

    torch.manual_seed(0)
    topology = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1)
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), topology=topology, device="cpu")
    module.save_state_dict(directory)
    return {
        "stage": module.stage_id,
        "model": topology.get_coord(dist.get_rank()).model,
        "embed": _tied_weight(module, "embed").detach().clone(),
    }


def test_pipe_data_model_topology(tmp_path: Path) -> None:
    results = spawn_ranks(_three_d, 4, str(tmp_path))
    assert sorted((r["stage"], r["model"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    embeds = [r["embed"] for r in results]
    assert all(torch.equal(embeds[0], e) for e in embeds), "every copy of the tie is identical"
    names = {path.name for path in tmp_path.iterdir()}
    assert {"layer_00-model_00-model_states.pt", "layer_00-model_01-model_states.pt"} <= names
