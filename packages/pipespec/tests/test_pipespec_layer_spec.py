"""LayerSpec: validation, building, immutability, equality, hashing, repr."""

from __future__ import annotations

import copy
import functools
import keyword
import logging
import pickle
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipespec import LayerSpec, TiedLayerSpec


class Block(torch.nn.Module):
    """A module with both a parameter and a buffer, built from arbitrary arguments."""

    def __init__(self, width: int = 4, *extra: object, scale: float = 1.0, **options: object):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.register_buffer("running", torch.zeros(width))
        self.extra = extra
        self.scale = scale
        self.options = options


def relu_fn(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


@pytest.mark.parametrize(
    "not_a_module_class",
    [
        torch.nn.Linear(2, 2),
        relu_fn,
        functools.partial(torch.nn.Linear, 2, 2),
        int,
        "Linear",
        None,
    ],
    ids=["instance", "function", "partial", "plain-class", "str", "none"],
)
def test_layer_spec_rejects_anything_but_a_module_class(not_a_module_class: Any) -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module subclass") as raised:
        LayerSpec(not_a_module_class)
    assert repr(not_a_module_class) in str(raised.value)


def test_build_constructs_the_class_with_the_stored_arguments() -> None:
    spec = LayerSpec(Block, 3, "a", scale=2.0, flag=True)
    module = spec.build()
    assert isinstance(module, Block)
    assert module.proj.in_features == 3
    assert module.extra == ("a",)
    assert module.scale == 2.0
    assert module.options == {"flag": True}


def test_each_build_returns_a_new_module_with_its_own_parameters() -> None:
    spec = LayerSpec(torch.nn.Linear, 4, 4)
    first, second = spec.build(), spec.build()
    assert isinstance(first, torch.nn.Linear)
    assert isinstance(second, torch.nn.Linear)
    assert first is not second
    assert first.weight is not second.weight
    with torch.no_grad():
        first.weight.zero_()
    assert second.weight.abs().sum() > 0


def test_build_on_meta_allocates_no_parameter_or_buffer() -> None:
    module = LayerSpec(Block, 8).build(device="meta")
    tensors = [*module.parameters(), *module.buffers()]
    assert tensors
    assert all(tensor.is_meta for tensor in tensors)


def test_build_on_a_torch_device_object() -> None:
    module = LayerSpec(Block, 8).build(device=torch.device("cpu"))
    assert all(p.device == torch.device("cpu") for p in module.parameters())


def test_build_without_device_follows_the_default_device() -> None:
    with torch.device("meta"):
        module = LayerSpec(torch.nn.Linear, 2, 2).build()
    assert module.weight.is_meta


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_build_creates_parameters_directly_on_cuda() -> None:
    module = LayerSpec(Block, 8).build(device="cuda")
    assert all(tensor.is_cuda for tensor in [*module.parameters(), *module.buffers()])


def test_build_logs_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    spec = LayerSpec(torch.nn.Linear, 2, 3, bias=False)
    with caplog.at_level(logging.INFO, logger="pipespec"):
        spec.build()
        assert caplog.records == []
        spec.build(log=True, device="meta")
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert record.name.startswith("pipespec")
    assert "Linear(2, 3, bias=False)" in record.getMessage()
    assert "meta" in record.getMessage()


def test_deepspeed_attribute_names_hold_the_arguments() -> None:
    spec = LayerSpec(Block, 5, "x", scale=0.5)
    assert spec.typename is Block
    assert spec.module_args == (5, "x")
    assert dict(spec.module_kwargs) == {"scale": 0.5}


@pytest.mark.parametrize("attribute", ["typename", "module_args", "module_kwargs", "new_name"])
def test_spec_attributes_cannot_be_assigned_or_deleted(attribute: str) -> None:
    spec = LayerSpec(Block, 5)
    with pytest.raises(AttributeError, match="immutable"):
        setattr(spec, attribute, None)
    with pytest.raises(AttributeError, match="immutable"):
        delattr(spec, attribute)
    assert spec == LayerSpec(Block, 5)


def test_module_kwargs_cannot_be_changed_through_the_spec_or_the_callers_dict() -> None:
    options = {"scale": 2.0}
    spec = LayerSpec(Block, 4, **options)
    options["scale"] = 3.0
    with pytest.raises(TypeError):
        spec.module_kwargs["scale"] = 5.0  # type: ignore[index]
    assert spec.build().scale == 2.0


def test_equal_specs_have_equal_hashes_and_work_as_dict_keys() -> None:
    first = LayerSpec(Block, 4, scale=2.0, flag=True)
    second = LayerSpec(Block, 4, flag=True, scale=2.0)
    assert first == second
    assert hash(first) == hash(second)
    assert {first: "built"}[second] == "built"


@pytest.mark.parametrize(
    "different",
    [
        LayerSpec(Block, 5, scale=2.0),
        LayerSpec(Block, 4, scale=3.0),
        LayerSpec(Block, 4),
        LayerSpec(Block, 4, 2.0),
        LayerSpec(torch.nn.Identity, 4, scale=2.0),
        TiedLayerSpec("block", Block, 4, scale=2.0),
    ],
)
def test_specs_differing_in_class_arguments_or_kind_are_unequal(different: LayerSpec) -> None:
    assert LayerSpec(Block, 4, scale=2.0) != different
    assert different != LayerSpec(Block, 4, scale=2.0)


def test_unhashable_arguments_fail_to_hash_with_a_clear_message_but_still_compare() -> None:
    spec = LayerSpec(Block, 4, sizes=[1, 2])
    with pytest.raises(TypeError, match=r"cannot be hashed.*unhashable.*tuple, not a list"):
        hash(spec)
    assert spec == LayerSpec(Block, 4, sizes=[1, 2])
    assert spec != LayerSpec(Block, 4, sizes=[1, 3])


def test_tensor_arguments_compare_by_value_without_raising() -> None:
    spec = LayerSpec(Block, 4, init=torch.arange(6.0))
    same = LayerSpec(Block, 4, init=torch.arange(6.0))
    assert spec == same
    assert hash(spec) == hash(same)
    assert spec != LayerSpec(Block, 4, init=torch.arange(6.0) + 1)
    assert spec != LayerSpec(Block, 4, init=torch.arange(6))
    assert spec != LayerSpec(Block, 4, init=6.0)


def test_repr_reads_like_the_constructor_call() -> None:
    assert repr(LayerSpec(torch.nn.Linear, 10, 20, bias=False)) == "Linear(10, 20, bias=False)"
    assert repr(LayerSpec(Block, "x", name="y")) == "Block('x', name='y')"
    assert repr(LayerSpec(torch.nn.ReLU)) == "ReLU()"


def test_pickle_and_deepcopy_give_equal_immutable_specs() -> None:
    spec = LayerSpec(Block, 4, scale=2.0)
    for clone in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec), copy.copy(spec)):
        assert clone == spec
        assert clone.build().scale == 2.0
        with pytest.raises(AttributeError):
            clone.typename = torch.nn.Identity


# Values whose repr evaluates back to an equal value.
argument_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.tuples(children, children) | st.lists(children, max_size=3),
    max_leaves=6,
)
# Names a call can use as keyword arguments: Python's own keywords (`as`, `if`) cannot be.
keyword_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda name: not keyword.iskeyword(name)
)


@given(
    args=st.lists(argument_values, max_size=4),
    kwargs=st.dictionaries(keyword_names, argument_values, max_size=4),
)
def test_repr_evaluates_back_to_an_equal_spec(args: list[Any], kwargs: dict[str, Any]) -> None:
    spec = LayerSpec(Block, *args, **kwargs)
    rebuilt = eval(repr(spec), {"Block": functools.partial(LayerSpec, Block)})
    assert rebuilt == spec
    assert spec == LayerSpec(Block, *copy.deepcopy(args), **copy.deepcopy(kwargs))
    expected = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    assert repr(spec) == f"Block({expected})"


@given(
    args=st.lists(st.integers() | st.text(max_size=4) | st.none(), max_size=4),
    kwargs=st.dictionaries(keyword_names, st.integers() | st.booleans(), max_size=4),
)
def test_hash_agrees_with_equality_for_hashable_arguments(
    args: list[Any], kwargs: dict[str, Any]
) -> None:
    spec = LayerSpec(Block, *args, **kwargs)
    reordered = dict(reversed(list(kwargs.items())))
    twin = LayerSpec(Block, *args, **reordered)
    assert spec == twin
    assert hash(spec) == hash(twin)
    assert len({spec, twin}) == 1


def test_builds_same_module_ignores_tie_extras_but_not_arguments() -> None:
    from pipespec import TiedLayerSpec

    def head(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    embed = TiedLayerSpec("embed", torch.nn.Embedding, 10, 4)
    assert embed.builds_same_module(
        TiedLayerSpec("other", torch.nn.Embedding, 10, 4, forward_fn=head)
    )
    assert embed.builds_same_module(LayerSpec(torch.nn.Embedding, 10, 4))
    assert not embed.builds_same_module(TiedLayerSpec("embed", torch.nn.Embedding, 10, 8))
    assert not embed.builds_same_module(LayerSpec(torch.nn.Linear, 10, 4))
