"""describe(): names, kinds and parameter counts, with no allocation and no RNG side effects."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import subprocess
import sys
import textwrap
from typing import Any, cast

import numpy as np
import pytest
import torch

from pipespec import LayerInfo, LayerKind, LayerSpec, TiedLayerSpec, describe


class TiedHead(torch.nn.Module):
    """An embedding whose weight is reused by the output projection (one shared Parameter)."""

    def __init__(self, vocab: int = 10, width: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight


class PartlyFrozen(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3)  # 12 parameters
        self.trainable = torch.nn.Linear(3, 2, dtype=torch.float16)  # 8 parameters
        self.frozen.requires_grad_(False)


class DrawsRandomNumbersOnCpu(torch.nn.Module):
    """Draws from every global generator in __init__, explicitly on the CPU."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.register_buffer("noise", torch.rand(3, device="cpu"))
        self.python_draw = random.random()
        self.numpy_draw = float(np.random.rand())
        self.proj = torch.nn.Linear(width, width)


class ReadsValuesInInit(torch.nn.Module):
    """Draws random numbers, then fails on meta by reading a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.rand(3, device="cpu"))
        self.python_draw = random.random()
        self.proj = torch.nn.Linear(2, 2)
        self.norm = float(self.proj.weight.norm().item())


class CallableWithoutName:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


def test_describe_spec_counts_parameters_without_building_them_for_real() -> None:
    info = describe(LayerSpec(torch.nn.Linear, 10, 20))
    assert info == LayerInfo(
        name="Linear",
        kind=LayerKind.SPEC,
        num_params=220,
        trainable_params=220,
        param_bytes=880,
        tie_key=None,
    )


def test_describe_tied_spec_reports_its_key() -> None:
    info = describe(TiedLayerSpec("embed", torch.nn.Embedding, 100, 16, dtype=torch.bfloat16))
    assert info.kind == LayerKind.TIED
    assert info.tie_key == "embed"
    assert info.name == "Embedding"
    assert (info.num_params, info.param_bytes) == (1600, 3200)


def test_describe_built_module_matches_describe_of_its_spec() -> None:
    from_module = describe(PartlyFrozen())
    from_spec = describe(LayerSpec(PartlyFrozen))
    assert from_module.kind == LayerKind.MODULE
    assert from_spec.kind == LayerKind.SPEC
    assert dataclasses.replace(from_spec, kind=LayerKind.MODULE) == from_module
    assert from_module.name == "PartlyFrozen"
    assert from_module.num_params == 20
    assert from_module.trainable_params == 8
    assert from_module.param_bytes == 12 * 4 + 8 * 2


@pytest.mark.parametrize("layer", [TiedHead(), LayerSpec(TiedHead), TiedLayerSpec("t", TiedHead)])
def test_a_parameter_shared_inside_a_module_is_counted_once(layer: Any) -> None:
    info = describe(layer)
    assert info.num_params == 10 * 4
    assert info.trainable_params == 10 * 4
    assert info.param_bytes == 10 * 4 * 4


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (scale, "scale"),
        (functools.partial(scale, factor=2.0), "scale"),
        (functools.partial(functools.partial(scale), factor=2.0), "scale"),
        (lambda x: x, "<lambda>"),
        (torch.relu, "relu"),
        (torch.nn.functional.gelu, "gelu"),
        (CallableWithoutName(), "CallableWithoutName"),
    ],
)
def test_describe_callable_has_its_name_and_no_parameters(layer: Any, name: str) -> None:
    assert describe(layer) == LayerInfo(
        name=name, kind=LayerKind.CALLABLE, num_params=0, trainable_params=0, param_bytes=0
    )


@pytest.mark.parametrize("not_a_layer", [42, "Linear", None, [torch.nn.Linear(2, 2)]])
def test_describe_rejects_what_is_not_a_layer(not_a_layer: Any) -> None:
    with pytest.raises(TypeError, match="describe\\(\\) takes") as raised:
        describe(not_a_layer)
    assert repr(not_a_layer) in str(raised.value)


def test_describe_rejects_a_module_class_and_suggests_a_spec() -> None:
    with pytest.raises(TypeError, match=r"LayerSpec\(Linear, \.\.\.\)"):
        describe(torch.nn.Linear)


def test_layer_info_is_frozen() -> None:
    info = describe(torch.nn.Linear(2, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_params = 0  # type: ignore[misc]


def test_layer_kind_compares_and_formats_as_its_string() -> None:
    assert {kind.value for kind in LayerKind} == {"spec", "tied", "module", "callable"}
    tied: str = LayerKind.TIED  # a plain str to code that reads it as one
    assert tied == "tied"
    assert LayerKind("tied") is LayerKind.TIED
    assert f"{LayerKind.CALLABLE}" == "callable"
    assert str(LayerKind.SPEC) == "spec"


def _global_rng_states() -> tuple[Any, ...]:
    numpy_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return (
        torch.get_rng_state(),
        random.getstate(),
        numpy_state[0],
        numpy_state[1].copy(),
        numpy_state[2:],
    )


def _assert_same_states(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert before[2] == after[2]
    assert np.array_equal(before[3], after[3])
    assert before[4] == after[4]


@pytest.mark.parametrize(
    "spec", [LayerSpec(DrawsRandomNumbersOnCpu, 4), TiedLayerSpec("t", DrawsRandomNumbersOnCpu)]
)
def test_describe_leaves_every_global_rng_unchanged(spec: LayerSpec) -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    before = _global_rng_states()
    describe(spec)
    _assert_same_states(before, _global_rng_states())
    # The module really draws numbers: building it for real moves every generator.
    spec.build()
    after_build = _global_rng_states()
    assert not torch.equal(before[0], after_build[0])
    assert before[1] != after_build[1]
    assert not np.array_equal(before[3], after_build[3])


def test_describe_leaves_the_rng_unchanged_when_the_build_fails() -> None:
    before = _global_rng_states()
    with pytest.raises(RuntimeError, match="meta tensors") as raised:
        describe(LayerSpec(ReadsValuesInInit))
    _assert_same_states(before, _global_rng_states())
    if sys.version_info >= (3, 11):
        assert any("meta device" in note for note in raised.value.__notes__)


def test_weights_built_after_describe_equal_weights_built_without_it() -> None:
    spec = LayerSpec(DrawsRandomNumbersOnCpu, 4)
    torch.manual_seed(7)
    expected = spec.build().state_dict()
    torch.manual_seed(7)
    describe(spec)
    built_after_describe = spec.build().state_dict()
    assert all(torch.equal(built_after_describe[name], expected[name]) for name in expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_describe_leaves_an_initialised_cuda_rng_unchanged() -> None:
    class DrawsOnCuda(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("noise", torch.rand(3, device="cuda"))

    before = torch.cuda.get_rng_state()
    describe(LayerSpec(DrawsOnCuda))
    assert torch.equal(before, torch.cuda.get_rng_state())


# Runs in a fresh interpreter, because a process's peak resident memory only ever grows.
_DESCRIBE_HUGE_SPEC = textwrap.dedent(
    """
    import json, resource, time
    import torch
    from pipespec import LayerSpec, describe

    class Huge(torch.nn.Module):
        def __init__(self, depth, width):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(width, width) for _ in range(depth)
            )

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    info = describe(LayerSpec(Huge, 16, 8192))
    seconds = time.perf_counter() - start
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"num_params": info.num_params, "param_bytes": info.param_bytes,
                      "peak_growth_kib": peak_after - peak_before, "seconds": seconds}))
    """
)


def test_describing_a_billion_parameter_spec_allocates_no_parameter_memory() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", _DESCRIBE_HUGE_SPEC],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    assert measured["num_params"] == 16 * (8192 * 8192 + 8192)  # about 1.07e9
    assert measured["param_bytes"] == 4 * measured["num_params"]  # 4.3 GB if it were allocated
    assert measured["peak_growth_kib"] < 100 * 1024
    assert measured["seconds"] < 10


class _Constructed(torch.nn.Module):
    constructed = 0

    def __init__(self) -> None:
        super().__init__()
        _Constructed.constructed += 1


def test_layer_name_constructs_nothing() -> None:
    import functools

    from pipespec import LayerSpec, TiedLayerSpec, layer_name

    def gelu(x: torch.Tensor) -> torch.Tensor:
        return x

    before = _Constructed.constructed
    assert layer_name(LayerSpec(_Constructed)) == "_Constructed"
    assert layer_name(TiedLayerSpec("k", _Constructed)) == "_Constructed"
    assert _Constructed.constructed == before
    assert layer_name(torch.nn.ReLU()) == "ReLU"
    assert layer_name(functools.partial(functools.partial(gelu))) == "gelu"
