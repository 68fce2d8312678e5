"""Per-layer (DeepSpeed-named) files: never a mixture of two saves, checked before any load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipemodule import LayerSpec, PipelineModule
from pipemodule._resume import CheckpointError
from pipemodule._stage import checkpoint
from pipemodule.examples import FeedForwardBlock, gpt_layers
from pipetopo.testing import world_of_one


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> PipelineModule:
    torch.manual_seed(seed)
    module = PipelineModule(gpt_layers(12, 4, 2), num_stages=1, device="cpu")
    return module.to(dtype)


def _params(module: PipelineModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_an_interrupted_save_is_refused_until_a_save_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with world_of_one():
        _model().save_state_dict(tmp_path)
        real = checkpoint.atomic_save
        calls = []

        def full_disk(state: dict[str, torch.Tensor], path: Path) -> str:
            calls.append(path)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real(state, path)

        monkeypatch.setattr(checkpoint, "atomic_save", full_disk)
        with pytest.raises(OSError, match="No space"):
            _model(seed=1).save_state_dict(tmp_path)
        monkeypatch.undo()
        loaded = _model(seed=2)
        before = _params(loaded)
        with pytest.raises(CheckpointError, match="incomplete: a save into it did not finish"):
            loaded.load_state_dir(tmp_path)
        assert all(torch.equal(v, before[k]) for k, v in _params(loaded).items())
        saved = _model(seed=3)
        saved.save_state_dict(tmp_path)
        loaded.load_state_dir(tmp_path)
        assert all(torch.equal(v, _params(saved)[k]) for k, v in _params(loaded).items())


def test_a_corrupted_or_stale_file_is_refused_and_nothing_is_loaded(tmp_path: Path) -> None:
    with world_of_one():
        _model().save_state_dict(tmp_path)
        last = tmp_path / "layer_03-model_states.pt"
        torch.save(_model(seed=9).get_submodule("3").state_dict(), last)
        loaded = _model(seed=2)
        before = _params(loaded)
        with pytest.raises(CheckpointError, match=r"layer 3.*corrupted or from another save"):
            loaded.load_state_dir(tmp_path)
        # Layers 0 to 2 (and the tied embedding) were checked but not loaded.
        assert all(torch.equal(v, before[k]) for k, v in _params(loaded).items())


def test_a_dtype_mismatch_names_layer_tensor_and_dtypes(tmp_path: Path) -> None:
    with world_of_one():
        _model(dtype=torch.float64).save_state_dict(tmp_path)
        loaded = _model()
        before = _params(loaded)
        with pytest.raises(
            CheckpointError,
            match=r"layer 0 at .*'weight' is torch\.float64 in the file and torch\.float32",
        ):
            loaded.load_state_dir(tmp_path)
        assert all(torch.equal(v, before[k]) for k, v in _params(loaded).items())


def test_files_without_a_manifest_still_load(tmp_path: Path) -> None:
    with world_of_one():
        source = PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)], num_stages=1, device="cpu")
        # As DeepSpeed writes them: a state dict per layer and nothing else.
        torch.save(source.get_submodule("0").state_dict(), tmp_path / "layer_00-model_states.pt")
        target = PipelineModule([LayerSpec(torch.nn.Linear, 4, 4)], num_stages=1, device="cpu")
        target.load_state_dir(tmp_path)
        assert torch.equal(target.get_parameter("0.weight"), source.get_parameter("0.weight"))


def test_frozen_parameters_left_out_on_purpose_are_not_missing(tmp_path: Path) -> None:
    with world_of_one():
        torch.manual_seed(0)
        saved = PipelineModule([LayerSpec(FeedForwardBlock, 4)], num_stages=1, device="cpu")
        for name, parameter in saved.named_parameters():
            parameter.requires_grad_(not name.endswith("bias"))
        saved.save_state_dict(tmp_path, exclude_frozen_params=True)
        torch.manual_seed(1)
        loaded = PipelineModule([LayerSpec(FeedForwardBlock, 4)], num_stages=1, device="cpu")
        for name, parameter in loaded.named_parameters():
            parameter.requires_grad_(not name.endswith("bias"))
        frozen_before = loaded.get_parameter("0.up.bias").detach().clone()
        loaded.load_state_dir(tmp_path)  # strict=True by default
        assert torch.equal(loaded.get_parameter("0.up.weight"), saved.get_parameter("0.up.weight"))
        assert torch.equal(loaded.get_parameter("0.up.bias"), frozen_before)
