"""Full training-state checkpoints: resume equals the run that never stopped, on any layout."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from pipemodule import PipelineModule, PipelineTrainer
from pipemodule._resume import CheckpointError, latest_checkpoint, load_checkpoint
from pipemodule._resume.storage import read_metadata
from pipemodule.examples import gpt_layers
from pipetopo.testing import RankFailedError, spawn_ranks, world_of_one

VOCAB, HIDDEN, DEPTH = 16, 8, 2  # 5 layers
BATCH, SEQ, STEPS, LR, MAX_NORM = 8, 6, 4, 0.05, 0.5
TIMEOUT = 90.0


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ + 1), generator=generator)
    return [(step[:, :-1], step[:, 1:]) for step in tokens]


def _trainer(num_stages: int, *, seed: int = 0, hidden: int = HIDDEN) -> PipelineTrainer:
    torch.manual_seed(seed)
    module = PipelineModule(
        gpt_layers(VOCAB, hidden, DEPTH), num_stages=num_stages, loss_fn=_loss, device="cpu"
    )
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    return PipelineTrainer(
        module,
        optimizer,
        n_microbatches=num_stages,
        max_grad_norm=MAX_NORM,
        lr_scheduler=scheduler,
    )


def _state(trainer: PipelineTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def _run(
    num_stages: int, root: str, load: str | None, steps: list[int], save_after: list[int]
) -> dict[str, Any]:
    """Train ``steps`` (indices into the batches), loading first and saving after some."""
    trainer = _trainer(num_stages, seed=0 if load is None else 99)
    extra: dict[str, Any] = {}
    if load is not None:
        extra = trainer.load_checkpoint(load)
        assert trainer.step_count == steps[0]
        assert extra["next_batch"] == steps[0]
    grid = trainer.module.mpu()
    replicas, replica = grid.get_data_parallel_world_size(), grid.get_data_parallel_id()
    share = BATCH // replicas
    batches = _batches()
    losses = []
    for step in steps:
        inputs, targets = batches[step]
        mine = slice(replica * share, (replica + 1) * share)
        losses.append(trainer.train_step(inputs[mine], targets[mine]))
        if step + 1 in save_after:
            trainer.save_checkpoint(root, keep_last=3, next_batch=step + 1, tag="run")
    return {
        "replica": replica,
        "losses": losses,
        "state": _state(trainer),
        "norm": trainer.last_grad_norm,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "extra": extra,
    }


def _merged(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        if result["replica"] == 0:
            merged.update(result["state"])
    return merged


def test_resume_equals_uninterrupted_across_layouts(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    everything = list(range(STEPS))
    reference = spawn_ranks(_run, 4, 2, root, None, everything, [], timeout=TIMEOUT)
    expected = _merged(reference)
    # pipe 2 x data 2 trains two steps and saves; pipe 4 resumes, trains a step and saves;
    # pipe 2 x data 2 resumes from that and finishes.
    spawn_ranks(_run, 4, 2, root, None, [0, 1], [2], timeout=TIMEOUT)
    second = spawn_ranks(_run, 4, 4, root, root, [2], [3], timeout=TIMEOUT)
    third = spawn_ranks(_run, 4, 2, root, root, [3], [], timeout=TIMEOUT)
    for result in second:
        assert result["extra"] == {"next_batch": 2, "tag": "run"}
        torch.testing.assert_close(result["losses"], reference[0]["losses"][2:3])
    for result in third:
        torch.testing.assert_close(result["losses"], reference[0]["losses"][3:])
        assert result["norm"] == pytest.approx(reference[0]["norm"], rel=1e-5)
        assert result["lr"] == pytest.approx(reference[0]["lr"])
    resumed = _merged(third)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    names = sorted(path.name for path in Path(root).iterdir())
    assert names == ["latest", "step_00000002", "step_00000003"]


def test_resume_on_the_same_layout_is_bitwise(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    reference = spawn_ranks(_run, 2, 2, root, None, [0, 1, 2], [1], timeout=TIMEOUT)
    resumed = spawn_ranks(_run, 2, 2, root, f"{root}/step_00000001", [1, 2], [], timeout=TIMEOUT)
    for before, after in zip(reference, resumed, strict=True):
        assert after["losses"] == before["losses"][1:]
        for name, value in before["state"].items():
            assert torch.equal(after["state"][name], value), name


def _save_then_die_in_second_save(root: str) -> None:
    trainer = _trainer(2)
    batches = _batches()
    trainer.train_step(*batches[0])
    trainer.save_checkpoint(root, next_batch=1)
    trainer.train_step(*batches[1])
    if torch.distributed.get_rank() == 1:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        def die(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGKILL)

        FileSystemWriter.write_data = die  # type: ignore[method-assign]
    trainer.save_checkpoint(root, next_batch=2)


def _load_after_kill(root: str) -> dict[str, Any]:
    trainer = _trainer(2, seed=5)
    before = _state(trainer)
    try:
        trainer.load_checkpoint(Path(root) / ".step_00000002.staging")
    except CheckpointError as error:
        refused = str(error)
    else:
        refused = ""
    unchanged = all(torch.equal(v, before[k]) for k, v in _state(trainer).items())
    extra = trainer.load_checkpoint(root)
    return {"refused": refused, "unchanged": unchanged, "extra": extra, "step": trainer.step_count}


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    with pytest.raises(RankFailedError):
        spawn_ranks(_save_then_die_in_second_save, 2, root, timeout=TIMEOUT)
    committed = latest_checkpoint(root)
    assert committed is not None
    assert committed.name == "step_00000001"
    assert (Path(root) / ".step_00000002.staging").is_dir()
    for result in spawn_ranks(_load_after_kill, 2, root, timeout=TIMEOUT):
        assert "incomplete" in result["refused"]
        assert result["unchanged"]
        assert result["extra"] == {"next_batch": 1}
        assert result["step"] == 1


def _one_rank_trainer(**kwargs: Any) -> PipelineTrainer:
    trainer = _trainer(1, **kwargs)
    trainer.train_step(*_batches()[0])
    return trainer


def _snapshot(trainer: PipelineTrainer) -> tuple[dict[str, torch.Tensor], str]:
    return _state(trainer), repr(trainer.optimizer.state_dict())


def test_a_corrupted_file_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    with world_of_one():
        saved = _one_rank_trainer().save_checkpoint(tmp_path)
        [data] = saved.glob("*.distcp")
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        trainer = _one_rank_trainer(seed=3)
        before = _snapshot(trainer)
        with pytest.raises(CheckpointError, match="corrupted"):
            trainer.load_checkpoint(saved)
        assert _same(_snapshot(trainer), before)


def _same(a: tuple[dict[str, torch.Tensor], str], b: tuple[dict[str, torch.Tensor], str]) -> bool:
    return a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in b[0])


def test_a_wrong_model_or_optimizer_is_refused_without_changing_state(tmp_path: Path) -> None:
    with world_of_one():
        saved = _one_rank_trainer().save_checkpoint(tmp_path)
        wider = _one_rank_trainer(hidden=HIDDEN * 2)
        before = _snapshot(wider)
        shapes = r"'tied_modules\.embed\.weight' has shape \(16, 8\) in the checkpoint"
        with pytest.raises(CheckpointError, match=f"not of this model: {shapes}"):
            wider.load_checkpoint(saved)
        assert _same(_snapshot(wider), before)

        module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=1, device="cpu")
        sgd = PipelineTrainer(
            module, torch.optim.SGD(module.parameters(), lr=LR), n_microbatches=1, loss_fn=_loss
        )
        with pytest.raises(CheckpointError, match=r"torch\.optim\.adam\.Adam optimizer"):
            sgd.load_checkpoint(saved)
        adam = PipelineTrainer(
            module, torch.optim.Adam(module.parameters(), lr=LR), n_microbatches=1, loss_fn=_loss
        )
        with pytest.raises(
            CheckpointError, match=r"lr_scheduler torch\.optim\.lr_scheduler\.StepLR"
        ):
            adam.load_checkpoint(saved)


def test_keep_last_and_latest(tmp_path: Path) -> None:
    with world_of_one():
        trainer = _one_rank_trainer()
        assert latest_checkpoint(tmp_path) is None
        for step in range(1, 4):
            trainer.step_count = step
            path = trainer.save_checkpoint(tmp_path, keep_last=2, step=step)
            assert latest_checkpoint(tmp_path) == path
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "latest",
            "step_00000002",
            "step_00000003",
        ]
        fresh = _one_rank_trainer(seed=4)
        assert load_checkpoint(fresh, tmp_path) == {"step": 3}
        assert fresh.step_count == 3
        # Saving the same step again replaces it.
        trainer.save_checkpoint(tmp_path, keep_last=2, step=33)
        assert load_checkpoint(fresh, tmp_path) == {"step": 33}


def test_extra_state_round_trips_and_refuses_objects(tmp_path: Path) -> None:
    with world_of_one():
        trainer = _one_rank_trainer()
        extra = {
            "loader": {"epoch": 2, "order": torch.arange(5), "seen": [1, 2.5, "x", None]},
            "pair": (1, float("inf")),
        }
        saved = trainer.save_checkpoint(tmp_path, **extra)
        loaded = _one_rank_trainer(seed=2).load_checkpoint(saved)
        assert loaded["pair"] == (1, float("inf"))
        assert loaded["loader"]["seen"] == [1, 2.5, "x", None]
        assert torch.equal(loaded["loader"]["order"], torch.arange(5))
        with pytest.raises(TypeError, match="extra state 'bad' at 'x' is a pathlib"):
            trainer.save_checkpoint(tmp_path, bad={"x": Path("p")})
        with pytest.raises(ValueError, match="keep_last=0"):
            trainer.save_checkpoint(tmp_path, keep_last=0)


class _Boom:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_metadata_with_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(pickle.UnpicklingError, match="not a class of"):
        read_metadata(path)
