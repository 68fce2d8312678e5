"""The catalogue of user mistakes for pipespec: each one raises a typed error naming the fix.

One test per case, so a regression in any message or type fails CI (see the README's "What goes
wrong, and what you see").
"""

from __future__ import annotations

import pytest
import torch

from pipespec import LayerSpec, TiedLayerSpec, describe, resolve_tied_attr


def test_class_name_as_string_is_refused() -> None:
    with pytest.raises(TypeError, match=r"got 'Linear' \(a str\).*LayerSpec\(torch.nn.Linear"):
        LayerSpec("Linear", 2, 3)  # type: ignore[arg-type]


def test_built_module_instead_of_class() -> None:
    with pytest.raises(TypeError, match=r"pass the class \(Linear\)"):
        LayerSpec(torch.nn.Linear(2, 3))  # type: ignore[arg-type]


def test_class_that_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"subclass torch.nn.Module"):
        LayerSpec(int)  # type: ignore[arg-type]


def test_tie_key_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"key must be a str.*got 3"):
        TiedLayerSpec(3, torch.nn.Linear, 2, 3)  # type: ignore[arg-type]


def test_empty_tie_key() -> None:
    with pytest.raises(ValueError, match=r"must be non-empty"):
        TiedLayerSpec("", torch.nn.Linear, 2, 3)


def test_empty_tied_weight_attr() -> None:
    with pytest.raises(ValueError, match=r"nothing would be tied"):
        TiedLayerSpec("k", torch.nn.Linear, 2, 3, tied_weight_attr=[])


def test_tied_weight_attr_with_empty_step() -> None:
    with pytest.raises(ValueError, match=r"'a..b' is empty or has an empty step"):
        TiedLayerSpec("k", torch.nn.Linear, 2, 3, tied_weight_attr="a..b")


def test_tied_weight_attr_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"must be a str or a sequence"):
        TiedLayerSpec("k", torch.nn.Linear, 2, 3, tied_weight_attr=5)  # type: ignore[arg-type]


def test_tied_weight_attr_listed_twice() -> None:
    with pytest.raises(ValueError, match=r"more than once"):
        TiedLayerSpec("k", torch.nn.Linear, 2, 3, tied_weight_attr=["weight", "weight"])


def test_forward_fn_not_callable() -> None:
    with pytest.raises(TypeError, match=r"forward_fn must be a callable"):
        TiedLayerSpec("k", torch.nn.Linear, 2, 3, forward_fn=5)  # type: ignore[arg-type]


def test_hashing_a_spec_with_a_list_argument() -> None:
    with pytest.raises(TypeError, match=r"pass hashable arguments \(a tuple, not a list\)"):
        hash(LayerSpec(torch.nn.Linear, [2], 3))


def test_describing_something_that_is_not_a_layer() -> None:
    with pytest.raises(TypeError, match=r"describe\(\) takes a LayerSpec"):
        describe(5)  # type: ignore[arg-type]


def test_misspelt_tied_attribute() -> None:
    with pytest.raises(AttributeError, match=r"has no attribute 'wieght'.*named_parameters"):
        resolve_tied_attr(torch.nn.Linear(2, 3), "wieght")


def test_tied_attribute_that_is_not_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"is a int, not a tensor"):
        resolve_tied_attr(torch.nn.Linear(2, 3), "in_features")


def test_specs_are_immutable() -> None:
    spec = LayerSpec(torch.nn.Linear, 2, 3)
    with pytest.raises(AttributeError, match=r"immutable.*create a new spec"):
        spec.typename = torch.nn.ReLU
