"""A pipeline of one stage: forward, seeding, activation checkpointing, checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipemodule import LayerSpec, PipelineModule, TiedLayerSpec, count_parameters, default_seed_fn
from pipemodule.examples import FeedForwardBlock, gpt_layers
from pipetopo.testing import world_of_one


@pytest.fixture(autouse=True, scope="module")
def _world() -> Iterator[None]:
    with world_of_one():
        yield


class CountingLayer(torch.nn.Module):
    """A linear layer that counts its forward calls (recomputation runs forward again)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.linear(x))


class NoisyLayer(torch.nn.Module):
    """Adds noise from the global torch generator, to observe per-layer forward seeds."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.last_noise: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_noise = torch.rand(3)
        return x * self.scale


def double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def test_forward_matches_sequential_of_the_same_modules() -> None:
    module = PipelineModule(
        gpt_layers(vocab_size=32, hidden=8, depth=2), num_stages=1, device="cpu"
    )
    tokens = torch.randint(0, 32, (2, 5))
    embed = module.tied_modules["embed"]
    x = embed(tokens)
    for index in (1, 2, 3):
        x = module.get_submodule(str(index))(x)
    weight = embed.weight
    assert isinstance(weight, torch.Tensor)
    expected = x @ weight.t()
    torch.testing.assert_close(module(tokens), expected, rtol=0, atol=0)
    # A 1-tuple is unwrapped for the first layer, as DeepSpeed does.
    torch.testing.assert_close(module((tokens,)), expected, rtol=0, atol=0)


def test_state_dict_names_follow_deepspeed() -> None:
    module = PipelineModule(
        [LayerSpec(torch.nn.Linear, 2, 2), double, *gpt_layers(16, 2, 1)],
        num_stages=1,
        device="cpu",
    )
    names = set(module.state_dict())
    assert "0.weight" in names
    assert "tied_modules.embed.weight" in names
    assert not any(name.startswith("1.") for name in names), "callables are not registered"
    assert "3.up.weight" in names


def test_initial_weights_follow_the_user_seed() -> None:
    torch.manual_seed(1)
    first = PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)], num_stages=1, device="cpu")
    torch.manual_seed(1)
    again = PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)], num_stages=1, device="cpu")
    torch.manual_seed(2)
    other = PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)], num_stages=1, device="cpu")
    assert torch.equal(first.get_parameter("0.weight"), again.get_parameter("0.weight"))
    assert not torch.equal(first.get_parameter("0.weight"), other.get_parameter("0.weight"))


def test_layers_with_equal_specs_get_different_weights() -> None:
    module = PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)] * 2, num_stages=1, device="cpu")
    assert not torch.equal(module.get_parameter("0.weight"), module.get_parameter("1.weight"))


def test_construction_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    PipelineModule([LayerSpec(torch.nn.Linear, 64, 64)], num_stages=1, device="cpu")
    assert torch.equal(torch.rand(4), expected)


def test_seed_layers_gives_deepspeeds_weights() -> None:
    layers = [LayerSpec(torch.nn.Linear, 4, 4), LayerSpec(FeedForwardBlock, 4)]
    module = PipelineModule(layers, num_stages=1, seed_layers=True, base_seed=77, device="cpu")
    for index, spec in enumerate(layers):
        default_seed_fn(77 + index)
        reference = spec.build()
        for name, value in reference.state_dict().items():
            assert torch.equal(module.state_dict()[f"{index}.{name}"], value), (index, name)


def test_default_seed_fn_seeds_as_torch_manual_seed_without_recording_stacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(2024)
    expected = torch.rand(5), torch.randn(3)
    stacks: list[object] = []

    def record_stack(*args: object, **kwargs: object) -> list[str]:
        stacks.append(args)
        return []

    monkeypatch.setattr("traceback.format_stack", record_stack)
    default_seed_fn(2024)
    assert torch.equal(torch.rand(5), expected[0])
    assert torch.equal(torch.randn(3), expected[1])
    if not torch.cuda.is_available():
        # torch.manual_seed queues a seed, with the caller's stack, for every absent accelerator.
        assert stacks == []


def test_seed_layers_uses_distinct_seeds_inside_checkpointed_chunks() -> None:
    layers = [NoisyLayer() for _ in range(4)]
    module = PipelineModule(
        layers, num_stages=1, seed_layers=True, activation_checkpoint_interval=2, device="cpu"
    )
    module(torch.ones(2, requires_grad=True))
    noises = [layer.last_noise for layer in layers]
    assert all(noise is not None for noise in noises)
    # Layers 0 and 2 start the two chunks; DeepSpeed gives them the same seed.
    assert not torch.equal(noises[0], noises[2])  # type: ignore[arg-type]


def test_activation_checkpointing_recomputes_and_matches() -> None:
    layers = [CountingLayer(6) for _ in range(4)]
    plain = PipelineModule(layers, num_stages=1, device="cpu")
    x = torch.randn(3, 6, requires_grad=True)
    plain(x).sum().backward()
    expected_out = plain(x).detach()
    expected_grads = {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}
    expected_input_grad = x.grad.clone()  # type: ignore[union-attr]

    plain.zero_grad()
    x.grad = None
    for layer in layers:
        layer.calls = 0
    plain.set_checkpoint_interval(2)
    out = plain(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected_out)
    for name, parameter in plain.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name])
    torch.testing.assert_close(x.grad, expected_input_grad)
    assert [layer.calls for layer in layers] == [2, 2, 2, 2], "each chunk is recomputed once"


def test_checkpointable_layers_limits_which_chunks_are_checkpointed() -> None:
    calls: list[int] = []

    def recording_checkpoint(function: Any, *args: Any) -> Any:
        calls.append(len(args))
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    layers: list[Any] = [CountingLayer(3), CountingLayer(3), torch.nn.Linear(3, 3), double]
    module = PipelineModule(
        layers,
        num_stages=1,
        activation_checkpoint_interval=2,
        activation_checkpoint_func=recording_checkpoint,
        checkpointable_layers=["CountingLayer"],
        device="cpu",
    )
    module(torch.ones(1, 3))
    assert len(calls) == 1, "only the chunk made of CountingLayers is checkpointed"


def test_count_parameters_counts_ties_once() -> None:
    layers = gpt_layers(vocab_size=10, hidden=4, depth=1)
    embedding = 10 * 4
    block = 4 * 16 + 16 + 16 * 4 + 4
    norm = 2 * 4
    assert count_parameters(layers) == embedding + block + norm


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    layers = [*gpt_layers(vocab_size=12, hidden=4, depth=2), double]
    saved = PipelineModule(layers, num_stages=1, device="cpu")
    saved.save_state_dict(tmp_path)
    files = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("layer_"))
    # The tied module goes once, under its first occurrence, although its second use has a
    # forward_fn; the callable has no file. Beside them, the manifest that commits the save.
    assert [path.name for path in tmp_path.glob("pipestack-layers.*")] == [
        "pipestack-layers.layer_00.json"
    ]
    assert files == [
        "layer_00-model_states.pt",
        "layer_01-model_states.pt",
        "layer_02-model_states.pt",
        "layer_03-model_states.pt",
    ]
    torch.manual_seed(123)
    loaded = PipelineModule(layers, num_stages=1, device="cpu")
    assert not torch.equal(loaded.get_parameter("1.up.weight"), saved.get_parameter("1.up.weight"))
    loaded.load_state_dir(tmp_path)
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_load_names_the_missing_layer_file(tmp_path: Path) -> None:
    layers = gpt_layers(vocab_size=12, hidden=4, depth=2)
    module = PipelineModule(layers, num_stages=1, device="cpu")
    module.save_state_dict(tmp_path)
    (tmp_path / "layer_02-model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"layer 2: .*layer_02-model_states\.pt"):
        module.load_state_dir(tmp_path)


def test_load_names_a_mismatched_layer(tmp_path: Path) -> None:
    PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)], num_stages=1, device="cpu").save_state_dict(
        tmp_path
    )
    wider = PipelineModule([LayerSpec(torch.nn.Linear, 4, 8)], num_stages=1, device="cpu")
    with pytest.raises(RuntimeError, match=r"layer 0 at .*layer_00-model_states\.pt"):
        wider.load_state_dir(tmp_path)


def test_save_overwrites_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    module = PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)], num_stages=1, device="cpu")
    module.save_state_dict(tmp_path)
    module.save_state_dict(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "layer_00-model_states.pt",
        "pipestack-layers.layer_00.json",
    ]


def test_checkpoint_files_refuse_pickled_code(tmp_path: Path) -> None:
    module = PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)], num_stages=1, device="cpu")
    torch.save(
        {"weight": torch.zeros(4, 4), "bias": FeedForwardBlock(1)},
        tmp_path / "layer_00-model_states.pt",
    )
    with pytest.raises(RuntimeError, match="layer 0"):
        module.load_state_dir(tmp_path)


def test_tied_spec_without_forward_fn_runs_the_module() -> None:
    layers = [
        TiedLayerSpec("lin", torch.nn.Linear, 3, 3),
        TiedLayerSpec("lin", torch.nn.Linear, 3, 3),
    ]
    module = PipelineModule(layers, num_stages=1, device="cpu")
    linear = module.tied_modules["lin"]
    x = torch.randn(2, 3)
    torch.testing.assert_close(module(x), linear(linear(x)))
    assert len(list(module.parameters())) == 2
