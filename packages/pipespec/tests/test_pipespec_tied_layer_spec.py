"""TiedLayerSpec validation, normalisation, equality and repr; resolve_tied_attr."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipespec import LayerSpec, TiedLayerSpec, resolve_tied_attr


class EmbeddingWithHead(torch.nn.Module):
    def __init__(self, vocab: int = 10, width: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.proj = torch.nn.Linear(width, vocab)
        self.register_buffer("mask", torch.ones(vocab))
        self.label = "not a tensor"


def lm_head(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def other_head(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def test_tied_spec_is_a_layer_spec_that_builds_its_module() -> None:
    spec = TiedLayerSpec("embed", torch.nn.Embedding, 10, 4, padding_idx=0)
    assert isinstance(spec, LayerSpec)
    module = spec.build(device="meta")
    assert isinstance(module, torch.nn.Embedding)
    assert module.padding_idx == 0
    assert spec.key == "embed"
    assert spec.forward_fn is None
    assert spec.tied_weight_attr == ("weight",)
    assert spec.module_args == (10, 4)
    assert dict(spec.module_kwargs) == {"padding_idx": 0}


@pytest.mark.parametrize(
    ("given_attr", "normalised"),
    [
        ("weight", ("weight",)),
        (["weight"], ("weight",)),
        (("weight", "bias"), ("weight", "bias")),
        ("proj.weight", ("proj.weight",)),
        (["embed.weight", "proj.bias"], ("embed.weight", "proj.bias")),
    ],
)
def test_tied_weight_attr_is_normalised_to_a_tuple(
    given_attr: str | list[str] | tuple[str, ...], normalised: tuple[str, ...]
) -> None:
    spec = TiedLayerSpec("embed", EmbeddingWithHead, tied_weight_attr=given_attr)
    assert spec.tied_weight_attr == normalised
    assert spec == TiedLayerSpec("embed", EmbeddingWithHead, tied_weight_attr=normalised)


def test_changing_the_callers_list_later_does_not_change_the_spec() -> None:
    attrs = ["embed.weight"]
    spec = TiedLayerSpec("embed", EmbeddingWithHead, tied_weight_attr=attrs)
    attrs.append("proj.weight")
    assert spec.tied_weight_attr == ("embed.weight",)
    # And no default is shared between specs: each holds an immutable tuple.
    assert isinstance(TiedLayerSpec("a", EmbeddingWithHead).tied_weight_attr, tuple)


@pytest.mark.parametrize(
    ("bad_attr", "error"),
    [
        ("", ValueError),
        ([], ValueError),
        (["weight", ""], ValueError),
        ("proj..weight", ValueError),
        (".weight", ValueError),
        ("weight.", ValueError),
        (["weight", "weight"], ValueError),
        (["weight", 3], TypeError),
        (3, TypeError),
        ({"weight"}, TypeError),
        (None, TypeError),
    ],
)
def test_bad_tied_weight_attr_is_rejected_naming_it(bad_attr: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        TiedLayerSpec("embed", EmbeddingWithHead, tied_weight_attr=bad_attr)
    assert "tied" in str(raised.value)


@pytest.mark.parametrize(
    ("bad_key", "error"),
    [("", ValueError), ("embed.weight", ValueError), (3, TypeError), (None, TypeError)],
)
def test_bad_key_is_rejected_naming_it(bad_key: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="key") as raised:
        TiedLayerSpec(bad_key, torch.nn.Embedding, 10, 4)
    assert repr(bad_key) in str(raised.value)


def test_forward_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match="forward_fn") as raised:
        TiedLayerSpec("embed", torch.nn.Embedding, 10, 4, forward_fn="lm_head")  # type: ignore[arg-type]
    assert "'lm_head'" in str(raised.value)


def test_tied_spec_still_requires_a_module_class() -> None:
    with pytest.raises(TypeError, match=r"TiedLayerSpec needs a torch\.nn\.Module subclass"):
        TiedLayerSpec("embed", torch.nn.Embedding(10, 4))  # type: ignore[arg-type]


def test_tied_spec_is_immutable() -> None:
    spec = TiedLayerSpec("embed", torch.nn.Embedding, 10, 4)
    for attribute in ("key", "forward_fn", "tied_weight_attr", "typename"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(spec, attribute, None)
    assert spec.key == "embed"


@pytest.mark.parametrize(
    "different",
    [
        TiedLayerSpec("other", torch.nn.Embedding, 10, 4),
        TiedLayerSpec("embed", torch.nn.Embedding, 10, 4, forward_fn=lm_head),
        TiedLayerSpec("embed", torch.nn.Embedding, 10, 4, tied_weight_attr=("weight", "x")),
        TiedLayerSpec("embed", torch.nn.Embedding, 10, 5),
        LayerSpec(torch.nn.Embedding, 10, 4),
    ],
)
def test_equality_includes_key_forward_fn_and_tied_attrs(different: LayerSpec) -> None:
    spec = TiedLayerSpec("embed", torch.nn.Embedding, 10, 4)
    assert spec != different
    assert different != spec


def test_equal_tied_specs_hash_equal() -> None:
    first = TiedLayerSpec("embed", torch.nn.Embedding, 10, 4, forward_fn=lm_head)
    second = TiedLayerSpec(
        "embed", torch.nn.Embedding, 10, 4, forward_fn=lm_head, tied_weight_attr=["weight"]
    )
    assert first == second
    assert hash(first) == hash(second)
    assert first != TiedLayerSpec("embed", torch.nn.Embedding, 10, 4, forward_fn=other_head)


def test_repr_shows_key_spec_and_only_non_default_options() -> None:
    plain = TiedLayerSpec("embed", torch.nn.Embedding, 100, 16)
    assert repr(plain) == "TiedLayerSpec('embed', Embedding(100, 16))"
    full = TiedLayerSpec(
        "embed", torch.nn.Embedding, 100, 16, forward_fn=lm_head, tied_weight_attr=["weight", "x"]
    )
    assert repr(full) == (
        "TiedLayerSpec('embed', Embedding(100, 16), tied_weight_attr=('weight', 'x'), "
        "forward_fn=lm_head)"
    )


def test_pickled_tied_spec_keeps_every_field() -> None:
    spec = TiedLayerSpec(
        "embed", EmbeddingWithHead, 12, forward_fn=lm_head, tied_weight_attr="embed.weight"
    )
    for clone in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert clone == spec
        assert (clone.key, clone.forward_fn, clone.tied_weight_attr) == (
            "embed",
            lm_head,
            ("embed.weight",),
        )


@given(
    st.lists(
        st.from_regex(r"[a-z_][a-z0-9_]{0,5}(\.[a-z_][a-z0-9_]{0,5}){0,2}", fullmatch=True),
        min_size=1,
        max_size=4,
        unique=True,
    )
)
def test_any_list_of_dotted_paths_round_trips_as_a_tuple(paths: list[str]) -> None:
    spec = TiedLayerSpec("key", EmbeddingWithHead, tied_weight_attr=paths)
    assert spec.tied_weight_attr == tuple(paths)
    assert spec == TiedLayerSpec("key", EmbeddingWithHead, tied_weight_attr=tuple(paths))


def test_resolve_tied_attr_finds_parameters_buffers_and_nested_paths() -> None:
    module = EmbeddingWithHead()
    assert resolve_tied_attr(module, "proj.weight") is module.proj.weight
    assert resolve_tied_attr(module.embed, "weight") is module.embed.weight
    assert resolve_tied_attr(module, "mask") is module.mask
    assert isinstance(resolve_tied_attr(module, "embed.weight"), torch.nn.Parameter)


@pytest.mark.parametrize(
    ("path", "missing_step"),
    [("bias", "bias"), ("proj.scale", "scale"), ("head.weight", "head")],
)
def test_resolve_tied_attr_names_path_and_module_when_missing(path: str, missing_step: str) -> None:
    with pytest.raises(AttributeError) as raised:
        resolve_tied_attr(EmbeddingWithHead(), path)
    message = str(raised.value)
    assert repr(path) in message
    assert "EmbeddingWithHead" in message
    assert repr(missing_step) in message


def test_resolve_tied_attr_rejects_malformed_paths_and_non_tensors() -> None:
    module = EmbeddingWithHead()
    with pytest.raises(ValueError, match=r"proj\.\.weight"):
        resolve_tied_attr(module, "proj..weight")
    with pytest.raises(TypeError, match=r"'label' of EmbeddingWithHead is a str"):
        resolve_tied_attr(module, "label")
    with pytest.raises(TypeError, match=r"'proj' of EmbeddingWithHead is a Linear"):
        resolve_tied_attr(module, "proj")
