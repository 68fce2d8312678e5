"""Data-parallel modes (DDP, FSDP2) over pipe 2 x data 2 equal training in one process."""

# No `from __future__ import annotations`: DDP reads a comm hook's annotations as objects.

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch._C._distributed_c10d import GradBucket
from torch.distributed.tensor import DTensor
from torch.futures import Future
from torch.nn.parallel import DistributedDataParallel

from pipemodule import (
    PipelineModule,
    PipelineTrainer,
    data_parallel_of,
    shard_data_parallel,
)
from pipemodule.examples import gpt_layers
from pipetopo import PipeModelDataParallelTopology
from pipetopo.testing import spawn_ranks, world_of_one

VOCAB, HIDDEN, DEPTH = 16, 8, 2  # 5 layers; the embedding is tied to the LM head
BATCH, SEQ, STEPS, LR, MAX_NORM = 8, 6, 3, 0.05, 0.5
TIMEOUT = 120.0
BF16_RTOL = 3e-2
"""How far a bf16 run's losses may drift from the fp32 run's over STEPS steps (relative)."""


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (steps, BATCH, SEQ + 1), generator=generator)
    return [(step[:, :-1], step[:, 1:]) for step in tokens]


def _full_state(module: PipelineModule) -> dict[str, torch.Tensor]:
    # full_tensor() is collective over the data group: every data peer holds the same keys.
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
        for name, value in module.state_dict().items()
    }


def _module(stages_per_rank: int, schedule: str = "1f1b") -> PipelineModule:
    torch.manual_seed(0)
    return PipelineModule(
        gpt_layers(VOCAB, HIDDEN, DEPTH),
        num_stages=2,
        loss_fn=_loss,
        device="cpu",
        stages_per_rank=stages_per_rank,
        stage_placement="v" if schedule in ("zbvzerobubble", "dualpipev") else "loop",
    )


def _train(
    mode: str | None,
    schedule: str,
    stages_per_rank: int,
    precision: str = "fp32",
    n_microbatches: int = 4,
    accumulation_steps: int = 1,
    *,
    on_module: Callable[[PipelineModule], None] | None = None,
) -> dict[str, Any]:
    module = _module(stages_per_rank, schedule)
    if mode is not None:
        shard_data_parallel(module, mode, precision=precision)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    trainer = PipelineTrainer(
        module,
        optimizer,
        n_microbatches=n_microbatches,
        schedule=schedule,
        max_grad_norm=MAX_NORM,
        accumulation_steps=accumulation_steps,
    )
    if on_module is not None:
        on_module(module)
    grid = module.grid
    replicas, replica = grid.axis_size("data"), grid.axis_rank("data")
    share = BATCH // replicas
    losses, norms = [], []
    for inputs, targets in _batches():
        mine = slice(replica * share, (replica + 1) * share)
        if accumulation_steps == 1:
            losses.append(trainer.train_step(inputs[mine], targets[mine]))
        else:
            # The replica's share, cut into accumulation_steps calls.
            part = share // accumulation_steps
            call_losses = [
                trainer.train_step(
                    inputs[mine][i * part : (i + 1) * part],
                    targets[mine][i * part : (i + 1) * part],
                )
                for i in range(accumulation_steps)
            ]
            losses.append(sum(call_losses) / accumulation_steps)
        norms.append(trainer.last_grad_norm)
    embed: Any = None
    if "embed" in module.tied_modules:  # not under 'v' placement, on the ranks of stages 1 and 2
        embed = module.tied_modules["embed"].weight
        assert isinstance(embed, torch.Tensor)
        if isinstance(embed, DTensor):
            embed = embed.full_tensor()
        embed = embed.detach().clone()
    return {
        "replica": replica,
        "losses": losses,
        "norms": norms,
        "tied": embed,
        "state": _full_state(module),
        "sharded": any(isinstance(p, DTensor) for p in module.parameters()),
        "steps": trainer.step_count,
        "mode": plan.mode if (plan := data_parallel_of(module)) is not None else None,
    }


def _train_in_one_process() -> dict[str, Any]:
    """The reference: the same layers, whole batches, plain autograd and torch's clipping."""
    torch.manual_seed(0)
    module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=1, device="cpu")
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    losses, norms = [], []
    for inputs, targets in _batches():
        optimizer.zero_grad()
        loss = _loss(module(inputs), targets)
        torch.autograd.backward(loss)
        norms.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), MAX_NORM)))
        optimizer.step()
        losses.append(float(loss))
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"losses": losses, "norms": norms, "state": state}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    [result] = spawn_ranks(_train_in_one_process, 1, timeout=TIMEOUT)
    assert isinstance(result, dict)
    return result


def _merged(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        if result["replica"] == 0:
            merged.update(result["state"])
    return merged


def _assert_matches(
    results: list[dict[str, Any]], reference: dict[str, Any], rtol: float, atol: float
) -> None:
    for result in results:
        torch.testing.assert_close(result["losses"], reference["losses"], rtol=rtol, atol=atol)
        torch.testing.assert_close(result["norms"], reference["norms"], rtol=rtol, atol=atol)
    merged = _merged(results)
    assert merged.keys() == reference["state"].keys()
    for name, value in reference["state"].items():
        torch.testing.assert_close(merged[name], value, rtol=rtol, atol=atol, msg=name)
    # The embedding's copies (stage 0, last stage) and replicas stay identical.
    tied = [result["tied"] for result in results if result["tied"] is not None]
    assert tied
    for copy in tied[1:]:
        assert torch.equal(copy, tied[0])


def _train_each(configs: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    # Several runs in one world: starting 4 processes costs far more than these steps.
    return [_train(*config) for config in configs]


def _by_config(results: list[list[dict[str, Any]]], index: int) -> list[dict[str, Any]]:
    return [rank[index] for rank in results]


MODES = [None, "replicate", "fsdp", "zero2"]
"""None: the trainer's default ('replicate', applied by the trainer)."""


@pytest.mark.parametrize(
    ("schedule", "stages_per_rank"), [("1f1b", 1), ("interleaved1f1b", 2)], ids=["1f1b", "int1f1b"]
)
def test_every_mode_equals_one_process(
    reference: dict[str, Any], schedule: str, stages_per_rank: int
) -> None:
    configs = [(mode, schedule, stages_per_rank) for mode in MODES]
    results = spawn_ranks(_train_each, 4, configs, timeout=TIMEOUT)
    # Every reference step was clipped: the norm must cover every shard, stage and replica.
    assert min(reference["norms"]) > MAX_NORM
    for index, mode in enumerate(MODES):
        runs = _by_config(results, index)
        _assert_matches(runs, reference, rtol=1e-5, atol=1e-6)
        assert all(run["sharded"] == (mode in ("fsdp", "zero2")) for run in runs), mode
        assert all(run["mode"] == (mode or "replicate") for run in runs)


def test_bf16_tracks_fp32(reference: dict[str, Any]) -> None:
    modes = ["replicate", "fsdp", "zero2"]
    results = spawn_ranks(
        _train_each, 4, [(mode, "1f1b", 1, "bf16") for mode in modes], timeout=TIMEOUT
    )
    for index in range(len(modes)):
        for run in _by_config(results, index):
            torch.testing.assert_close(run["losses"], reference["losses"], rtol=BF16_RTOL, atol=0)
            # Master weights stay float32.
            assert all(value.dtype == torch.float32 for value in run["state"].values())


def _resume(
    mode: str, root: str, load_from: str | None, steps: list[int], save_after: list[int]
) -> dict[str, Any]:
    module = _module(1)
    shard_data_parallel(module, mode)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    trainer = PipelineTrainer(module, optimizer, n_microbatches=2, max_grad_norm=MAX_NORM)
    if load_from is not None:
        trainer.load_checkpoint(load_from)
    replica, share = module.grid.axis_rank("data"), BATCH // 2
    batches = _batches(4)
    losses = []
    for step in steps:
        inputs, targets = batches[step]
        mine = slice(replica * share, (replica + 1) * share)
        losses.append(trainer.train_step(inputs[mine], targets[mine]))
        if step in save_after:
            trainer.save_checkpoint(root)
    return {"replica": replica, "losses": losses, "state": _full_state(module)}


def _across_modes(root: str, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each (saver, loader): 4 steps in ``saver``; 2 in it, saved, and 2 more in ``loader``."""
    results = []
    for index, (saver, loader) in enumerate(pairs):
        where = f"{root}/{index}"
        reference = _resume(saver, where + "_reference", None, [0, 1, 2, 3], [])
        _resume(saver, where, None, [0, 1], [1])
        resumed = _resume(loader, where, where, [2, 3], [])
        results.append({"reference": reference, "resumed": resumed})
    return results


def test_checkpoints_load_across_modes(tmp_path: Path) -> None:
    pairs = [("fsdp", "replicate"), ("replicate", "zero2")]
    results = spawn_ranks(_across_modes, 4, str(tmp_path), pairs, timeout=TIMEOUT)
    for index, pair in enumerate(pairs):
        reference = [rank[index]["reference"] for rank in results]
        resumed = [rank[index]["resumed"] for rank in results]
        for before, after in zip(reference, resumed, strict=True):
            torch.testing.assert_close(
                after["losses"], before["losses"][2:], rtol=1e-5, atol=1e-6, msg=str(pair)
            )
        merged_reference, merged_resumed = _merged(reference), _merged(resumed)
        for name, value in merged_reference.items():
            torch.testing.assert_close(
                merged_resumed[name], value, rtol=1e-5, atol=1e-6, msg=f"{pair}: {name}"
            )


def test_bad_settings_are_refused_before_any_collective() -> None:
    with world_of_one():
        module = PipelineModule(gpt_layers(VOCAB, HIDDEN, DEPTH), num_stages=1, device="cpu")
        with pytest.raises(TypeError, match="pass the PipelineModule"):
            shard_data_parallel(torch.nn.Linear(2, 2), "fsdp")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="mode='zero3'"):
            shard_data_parallel(module, "zero3")
        with pytest.raises(ValueError, match="precision='fp16'"):
            shard_data_parallel(module, "fsdp", precision="fp16")
        with pytest.raises(ValueError, match="bucket_cap_mb=0"):
            shard_data_parallel(module, bucket_cap_mb=0)
        plan = shard_data_parallel(module, "fsdp")
        assert data_parallel_of(module) is plan
        assert not plan.shards  # one replica: nothing to shard
        with pytest.raises(ValueError, match="already applied"):
            shard_data_parallel(module)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        with pytest.raises(ValueError, match="accumulation_steps=0"):
            PipelineTrainer(
                module, optimizer, n_microbatches=2, loss_fn=_loss, accumulation_steps=0
            )


SPLIT_BACKWARD_RUNS = [
    *((mode, "zbvzerobubble", 2) for mode in (None, "fsdp", "zero2")),
    *((mode, "dualpipev", 2) for mode in ("replicate", "fsdp", "zero2")),
    ("fsdp", "interleavedzerobubble", 2),
]
"""Schedules that split backward, in every mode; 'v' placement (ZBV, DualPipeV) puts the
embedding and the LM head, one tensor, on rank 0's stages 0 and 3, which is kept whole."""


def test_split_backward_schedules_in_every_mode_equal_one_process(
    reference: dict[str, Any],
) -> None:
    results = spawn_ranks(_train_each, 4, SPLIT_BACKWARD_RUNS, timeout=TIMEOUT)
    for index, config in enumerate(SPLIT_BACKWARD_RUNS):
        runs = _by_config(results, index)
        try:
            _assert_matches(runs, reference, rtol=1e-5, atol=1e-6)
        except AssertionError as error:
            raise AssertionError(f"{config}: {error}") from error
        assert all(run["mode"] == (config[0] or "replicate") for run in runs)


# ---- accumulation: one reduction per window

ACCUMULATION_MODES = [("replicate", "1f1b", 1), ("fsdp", "1f1b", 1), ("zero2", "zbvzerobubble", 2)]
"""DDP, FSDP resharding after forward, and FSDP under a split backward."""
SPLIT_REPLICATE = ("replicate", "zbvzerobubble", 2)
"""'replicate' under a split backward: per-stage buckets instead of DDP."""


class _Counter:
    """Gradient reductions over replicas: DDP's buckets, FSDP's reduce-scatters, our buckets.

    The loss average and the tied parameters' average are blocking all-reduces once per call
    or per step whatever the accumulation; only the asynchronous bucket all-reduces of a
    split backward are counted among ``dist.all_reduce`` calls.
    """

    def __init__(self) -> None:
        self.count = 0
        all_reduce, reduce_scatter = dist.all_reduce, dist.reduce_scatter_single

        def counted_all_reduce(*args: Any, **kwargs: Any) -> Any:
            self.count += bool(kwargs.get("async_op"))
            return all_reduce(*args, **kwargs)

        def counted_reduce_scatter(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return reduce_scatter(*args, **kwargs)

        dist.all_reduce = counted_all_reduce
        dist.reduce_scatter_single = counted_reduce_scatter

    def hook(self, state: Any, bucket: GradBucket) -> Future[torch.Tensor]:
        """A DDP comm hook: count, then average as DDP does by default."""
        self.count += 1
        group = state if isinstance(state, dist.ProcessGroup) else None
        tensor = bucket.buffer().div_(dist.get_world_size(group))
        work = dist.all_reduce(tensor, group=group, async_op=True)
        assert work is not None
        averaged: Future[torch.Tensor] = work.get_future().then(_first)
        return averaged


def _first(done: Future[list[torch.Tensor]]) -> torch.Tensor:
    return done.value()[0]


def _counted(configs: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    counter = _Counter()

    def on_module(module: Any) -> None:
        plan = data_parallel_of(module)
        assert plan is not None
        for stage in plan.stages:
            if isinstance(stage, DistributedDataParallel):
                stage.register_comm_hook(stage.process_group, counter.hook)

    results = []
    for config in configs:
        before = counter.count
        result = _train(*config, on_module=on_module)
        result["reductions"] = counter.count - before
        results.append(result)
    return results


def test_two_calls_of_m_equal_one_call_of_2m_and_reduce_once_per_step() -> None:
    configs = [
        (mode, schedule, per_rank, "fp32", m, k)
        for mode, schedule, per_rank in [*ACCUMULATION_MODES, SPLIT_REPLICATE]
        for m, k in ((4, 1), (2, 2))
    ]
    results = spawn_ranks(_counted, 4, configs, timeout=TIMEOUT)
    for index in range(0, len(configs), 2):
        name = str(configs[index][:2])
        once, twice = _by_config(results, index), _by_config(results, index + 1)
        for a, b in zip(once, twice, strict=True):
            torch.testing.assert_close(a["losses"], b["losses"], rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(a["norms"], b["norms"], rtol=1e-5, atol=1e-6, msg=name)
            assert a["steps"] == b["steps"] == STEPS
            # Reducing at every call would double the count: one window, one reduction.
            assert a["reductions"] > 0, name
            assert b["reductions"] == a["reductions"], name
        merged_once, merged_twice = _merged(once), _merged(twice)
        for key, value in merged_once.items():
            torch.testing.assert_close(
                merged_twice[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}"
            )


# ---- a model axis, and layer files across modes


def _train_beside_a_model_axis(mode: str) -> dict[str, Any]:
    # pipe 1 x model 2 x data 2: the model ranks hold the same (unsplit) layers and batch.
    torch.manual_seed(0)
    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, DEPTH),
        topology=PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=2),
        loss_fn=_loss,
        device="cpu",
    )
    shard_data_parallel(module, mode)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    trainer = PipelineTrainer(module, optimizer, n_microbatches=2, max_grad_norm=MAX_NORM)
    replica, share = module.grid.axis_rank("data"), BATCH // 2
    losses, norms = [], []
    for inputs, targets in _batches():
        mine = slice(replica * share, (replica + 1) * share)
        losses.append(trainer.train_step(inputs[mine], targets[mine]))
        norms.append(trainer.last_grad_norm)
    embed = module.tied_modules["embed"].weight
    state = _full_state(module)
    return {
        "replica": replica,
        "losses": losses,
        "norms": norms,
        "state": state,
        "tied": state[next(name for name in state if "embed" in name)],
        "embed_sharded": type(embed).__name__ == "DTensor",
    }


def test_fsdp_beside_a_model_axis_equals_one_process() -> None:
    [reference] = spawn_ranks(_train_in_one_process, 1, timeout=TIMEOUT)
    results = spawn_ranks(_train_beside_a_model_axis, 4, "fsdp", timeout=TIMEOUT)
    _assert_matches(results, reference, rtol=1e-5, atol=1e-6)
    assert all(result["embed_sharded"] for result in results)


def _save_sharded_load_replicated(root: str) -> dict[str, Any]:
    sharded = _module(1)
    shard_data_parallel(sharded, "fsdp")
    initial = _full_state(sharded)
    optimizer = torch.optim.Adam(sharded.parameters(), lr=LR)
    trainer = PipelineTrainer(sharded, optimizer, n_microbatches=2, max_grad_norm=MAX_NORM)
    replica, share = sharded.grid.axis_rank("data"), BATCH // 2
    for inputs, targets in _batches(2):
        mine = slice(replica * share, (replica + 1) * share)
        trainer.train_step(inputs[mine], targets[mine])
    sharded.save_state_dict(root)
    replicated = _module(1)
    shard_data_parallel(replicated, "replicate")
    replicated.load_state_dir(root)
    resharded = _module(1)
    shard_data_parallel(resharded, "fsdp")
    resharded.load_state_dir(root)
    return {
        "initial": initial,
        "trained": _full_state(sharded),
        "loaded": {k: v.detach().clone() for k, v in replicated.state_dict().items()},
        "loaded sharded": _full_state(resharded),
    }


def test_layer_files_saved_under_fsdp_load_into_replicated_and_sharded_runs(tmp_path: Path) -> None:
    results = spawn_ranks(_save_sharded_load_replicated, 4, str(tmp_path), timeout=TIMEOUT)
    for result in results:
        assert result["loaded"].keys() == result["trained"].keys()
        assert result["loaded sharded"].keys() == result["trained"].keys()
        for name, value in result["trained"].items():
            torch.testing.assert_close(result["loaded"][name], value, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(
                result["loaded sharded"][name], value, rtol=0, atol=0, msg=name
            )
            # Two Adam steps moved every weight: the files hold trained values, not the seeds.
            assert not torch.equal(value, result["initial"][name]), name
