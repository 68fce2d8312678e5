"""Pipeline scenarios run under ``torchrun``: one launch runs every scenario for its world size.

Usage (what ``test_integration_pipeline.py`` runs)::

    torchrun --standalone --nproc-per-node N pipeline_scenarios.py --out DIR \\
        [--backend gloo|nccl] [--save-to DIR] [--load-from DIR]

Every rank writes ``DIR/rank_<R>.pt`` (the tensors and facts each scenario produced, for the
pytest driver to compare with a single-process reference) and ``DIR/rank_<R>.json`` (which
scenarios finished, how long they took, the traceback of the one that failed). Both files are
rewritten after every scenario, so a crash leaves the results of the scenarios before it.
The script checks nothing itself: judging is the driver's job, where a failure is reported
with the values that differ. It exits non-zero when a scenario raises.

The model, inputs and seeds are module constants, imported by the driver to build its reference.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipemodule import PipelineModule
from pipemodule.examples import gpt_layers
from pipespec import Layer
from pipetopo import PipeModelDataParallelTopology, ProcessTopology

VOCAB, HIDDEN, DEPTH = 32, 8, 5  # gpt_layers: tied embedding, 5 blocks, LayerNorm, tied head
BATCH, SEQUENCE = 2, 6
LEARNING_RATE = 0.1
TIE_KEY = "embed"

# One seed per scenario, so that no scenario can pass by reusing another's weights.
SEED_FORWARD = 11
SEED_TRAIN = 12
SEED_INIT = 13
SEED_SAVE = 14
SEED_LOAD = 15  # differs from SEED_SAVE: every loaded value must come from the files
SEED_TOPOLOGY = 16

# Topologies of 4 ranks with a model axis: name -> (num_pp, num_mp, num_dp), DeepSpeed's order.
TOPOLOGIES: dict[str, tuple[int, int, int]] = {
    "pp2_mp2_dp1": (2, 2, 1),
    "pp2_mp1_dp2": (2, 1, 2),
}

Payload = dict[str, object]
"""What one scenario reports from one rank: str keys; tensors, numbers, strings, lists, dicts."""


def model_layers() -> list[Layer]:
    return gpt_layers(VOCAB, HIDDEN, DEPTH)


def input_tokens() -> torch.Tensor:
    return (torch.arange(BATCH * SEQUENCE).reshape(BATCH, SEQUENCE) * 7 + 1) % VOCAB


def target_tokens() -> torch.Tensor:
    return (torch.arange(BATCH * SEQUENCE).reshape(BATCH, SEQUENCE) * 5 + 3) % VOCAB


def scramble(parameters: dict[str, torch.Tensor]) -> None:
    """Move every value away from anything a fresh initialisation produces (ones, zeros, ...)."""
    with torch.no_grad():
        for value in parameters.values():
            value.mul_(-1.5).add_(0.25)


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    save_to: Path | None
    load_from: Path | None


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def _tied_weight(module: PipelineModule) -> torch.Tensor | None:
    if TIE_KEY not in module.tied_modules:
        return None
    weight = module.tied_modules[TIE_KEY].weight
    assert isinstance(weight, torch.Tensor)
    return weight


class StageRun:
    """One micro-batch through the pipeline, stage by stage, with point-to-point sends.

    Activations go from each stage to the next, at this rank's data and model coordinates, and
    in ``backward`` the gradient of each stage's input goes back to the previous stage.
    """

    def __init__(self, module: PipelineModule, device: torch.device) -> None:
        self.module = module
        self.grid = module.mpu()
        self.device = device
        self.stage = module.stage_id
        self.stage_input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def forward(self, *, requires_grad: bool) -> torch.Tensor:
        grid = self.grid
        if grid.is_first_stage:
            x = input_tokens().to(self.device)
        else:
            x = torch.empty(BATCH, SEQUENCE, HIDDEN, device=self.device)
            dist.recv(x, src=grid.stage_to_global(self.stage - 1))
            x.requires_grad_(requires_grad)
            self.stage_input = x
        with torch.set_grad_enabled(requires_grad):
            out = self.module(x)
        assert isinstance(out, torch.Tensor)
        if not grid.is_last_stage:
            dist.send(out.detach().contiguous(), dst=grid.stage_to_global(self.stage + 1))
        self.output = out
        return out

    def backward(self, loss: torch.Tensor | None) -> None:
        grid = self.grid
        assert self.output is not None
        if grid.is_last_stage:
            assert loss is not None
            torch.autograd.backward(loss)
        else:
            grad = torch.empty_like(self.output)
            dist.recv(grad, src=grid.stage_to_global(self.stage + 1))
            torch.autograd.backward(self.output, grad)
        if not grid.is_first_stage:
            assert self.stage_input is not None
            grad_of_input = self.stage_input.grad
            assert grad_of_input is not None
            dist.send(grad_of_input.contiguous(), dst=grid.stage_to_global(self.stage - 1))


def _build(
    seed: int,
    ctx: Context,
    *,
    num_stages: int | None = None,
    topology: ProcessTopology | None = None,
) -> PipelineModule:
    torch.manual_seed(seed)
    return PipelineModule(
        model_layers(), num_stages=num_stages, topology=topology, device=ctx.device
    )


def _forward_output(module: PipelineModule, ctx: Context) -> torch.Tensor | None:
    run = StageRun(module, ctx.device)
    out = run.forward(requires_grad=False)
    return out.detach().cpu() if module.mpu().is_last_stage else None


# ---------------------------------------------------------------------------------- scenarios


def forward(ctx: Context) -> Payload:
    """One stage per rank; the last stage's logits and every rank's weights."""
    module = _build(SEED_FORWARD, ctx, num_stages=ctx.world_size)
    return {
        "stage": module.stage_id,
        "parts": list(module.parts),
        "state": _cpu_state(module),
        "output": _forward_output(module, ctx),
    }


def train(ctx: Context) -> Payload:
    """One SGD step through every stage; tied gradients summed across the tie's stages."""
    module = _build(SEED_TRAIN, ctx, num_stages=ctx.world_size)
    initial = _cpu_state(module)
    run = StageRun(module, ctx.device)
    out = run.forward(requires_grad=True)
    loss = loss_of(out, target_tokens().to(ctx.device)) if module.mpu().is_last_stage else None
    run.backward(loss)
    module.allreduce_tied_weight_gradients()
    torch.optim.SGD(module.parameters(), lr=LEARNING_RATE).step()
    return {
        "stage": module.stage_id,
        "holds_tie": _tied_weight(module) is not None,
        "initial": initial,
        "final": _cpu_state(module),
        "loss": None if loss is None else loss.item(),
    }


def init(ctx: Context) -> Payload:
    """The same seed with every stage count the world size allows."""
    by_stages: dict[str, object] = {}
    for stages in (1, 2, 4):
        if ctx.world_size % stages:
            continue
        module = _build(SEED_INIT, ctx, num_stages=stages)
        by_stages[str(stages)] = {"stage": module.stage_id, "state": _cpu_state(module)}
    return by_stages


def save(ctx: Context) -> Payload:
    """Four stages write a checkpoint of scrambled weights into ``--save-to``."""
    assert ctx.save_to is not None
    module = _build(SEED_SAVE, ctx, num_stages=4)
    scramble(dict(module.named_parameters()))
    module.save_state_dict(ctx.save_to)
    return {"stage": module.stage_id, "state": _cpu_state(module)}


def load(ctx: Context) -> Payload:
    """Two stages (times world/2 replicas) read the checkpoint in ``--load-from``."""
    assert ctx.load_from is not None
    module = _build(SEED_LOAD, ctx, num_stages=2)
    before = _cpu_state(module)
    module.load_state_dir(ctx.load_from)
    return {
        "stage": module.stage_id,
        "data": module.mpu().get_data_parallel_id(),
        "before": before,
        "after": _cpu_state(module),
    }


def tie_gradient(coord: dict[str, int]) -> float:
    """The gradient each copy of the tie gets in ``topology``: different on every pipe line."""
    return float((coord["pipe"] + 1) * (1 + coord["data"] + 2 * coord["model"]))


def topology(ctx: Context) -> Payload:
    """Pipe x data x model layouts: coordinates, forward along each pipe line, tie groups."""
    results: dict[str, object] = {}
    for name, (num_pp, num_mp, num_dp) in TOPOLOGIES.items():
        topo: ProcessTopology = PipeModelDataParallelTopology(
            num_pp=num_pp, num_mp=num_mp, num_dp=num_dp
        )
        module = _build(SEED_TOPOLOGY, ctx, topology=topo)
        grid = module.mpu()
        coord = grid.coord.as_dict()
        output = _forward_output(module, ctx)
        tie_groups = [
            dist.get_process_group_ranks(group) for _, group in module.get_tied_weights_and_groups()
        ]
        state = _cpu_state(module)  # before the step below changes the tie
        weight = _tied_weight(module)
        assert weight is not None  # both stages end with or start with the tied embedding
        before = weight.detach().cpu().clone()
        weight.grad = torch.full_like(weight, tie_gradient(coord))
        module.allreduce_tied_weight_gradients()
        torch.optim.SGD([weight], lr=LEARNING_RATE).step()
        results[name] = {
            "stage": module.stage_id,
            "coord": coord,
            "data_parallel_id": grid.get_data_parallel_id(),
            "previous": grid.stage_to_global(module.stage_id - 1) if module.stage_id else None,
            "next": None if grid.is_last_stage else grid.stage_to_global(module.stage_id + 1),
            "tie_groups": tie_groups,
            "state": state,
            "output": output,
            "tie_before": before,
            "tie_after": weight.detach().cpu().clone(),
        }
    return results


Scenario = Callable[[Context], Payload]


def scenarios_for(ctx: Context) -> list[tuple[str, Scenario]]:
    chosen: list[tuple[str, Scenario]] = [("forward", forward), ("train", train), ("init", init)]
    if ctx.save_to is not None:
        chosen.append(("save", save))
    if ctx.load_from is not None:
        chosen.append(("load", load))
    if ctx.world_size == 4:
        chosen.append(("topology", topology))
    return chosen


# ---------------------------------------------------------------------------------- runner


class Recorder:
    """This rank's results, rewritten in full after each scenario."""

    def __init__(self, out: Path, rank: int) -> None:
        self.rank = rank
        self.tensors_path = out / f"rank_{rank}.pt"
        self.status_path = out / f"rank_{rank}.json"
        self.payloads: dict[str, Payload] = {}
        self.seconds: dict[str, float] = {}
        self.failed_scenario: str | None = None
        self.traceback = ""

    def done(self, name: str, payload: Payload, seconds: float) -> None:
        self.payloads[name] = payload
        self.seconds[name] = round(seconds, 3)
        self._write()

    def failed(self, name: str, error_text: str) -> None:
        self.failed_scenario = name
        self.traceback = error_text
        self._write()

    def _write(self) -> None:
        _replace(self.tensors_path, lambda path: torch.save(self.payloads, path))
        status = {
            "rank": self.rank,
            "completed": list(self.payloads),
            "seconds": self.seconds,
            "failed": self.failed_scenario,
            "traceback": self.traceback,
        }
        _replace(self.status_path, lambda path: path.write_text(json.dumps(status, indent=1)))


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    # The driver may read after a crash: a file is either complete or the previous version.
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rank_<R>.pt/.json")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--save-to", type=Path, help="run 'save': a 4-stage checkpoint here")
    parser.add_argument("--load-from", type=Path, help="run 'load': read this checkpoint")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Shorter than the driver's kill timeout, so a stuck collective fails with a traceback.
    dist.init_process_group(args.backend, timeout=timedelta(seconds=60))
    try:
        rank = dist.get_rank()
        ctx = Context(rank, dist.get_world_size(), device, args.save_to, args.load_from)
        args.out.mkdir(parents=True, exist_ok=True)
        recorder = Recorder(args.out, rank)
        for name, scenario in scenarios_for(ctx):
            start = time.perf_counter()
            try:
                payload = scenario(ctx)
            except BaseException:
                recorder.failed(name, traceback.format_exc())
                raise
            recorder.done(name, payload, time.perf_counter() - start)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
