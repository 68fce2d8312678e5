"""Measure every torch pipeline schedule's bubble with sleeping layers, against its simulation.

Compute-bound layers cannot show a bubble when 4 ranks share 2 cores, so every layer's work is
a fixed sleep: sleeping frees the core, so a rank's idle time is the schedule's, not the CPU's.
A layer's forward sleeps, its input-gradient pass sleeps and its weight-gradient pass sleeps,
each a known time (`SleepLayer`), so the zero-bubble schedules' split backward is exercised as
well. F, I and W are per rank share of layers: the layer list (``--layers``, default 8) is cut
into ``P * V`` stages, so every layout does the same work per rank.

One 4-rank gloo job on CPU runs every schedule and micro-batch count: ``--warmup`` steps, then
``--steps`` timed ones (barrier, step, barrier), ``--rounds`` times, configurations interleaved
so load changes hit them alike; the step time is the median. The *ideal* is the busiest rank's
work, ``m * (F + I + W)``; the measured bubble is ``1 - ideal / step``; the expected one comes
from simulating torch's own action order with the same F / I / W and free communication
(tools/schedule_sim.py). The default sleeps are long (150 ms per rank share) because torch's
runtime itself costs about 1-3 ms of CPU per action on this machine (autograd, gloo sends and
waits, bookkeeping), and the zero-bubble schedules have every action on the critical path.

    hatch run bench-schedules                     # P = 4, m = 8 and 16, every schedule
    hatch run bench-schedules --quick             # m = 8, shorter sleeps, one round
    hatch run bench-schedules --schedules 1F1B ZBVZeroBubble -m 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The repository root, so that tools/ imports as a namespace package here and under torchrun.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.schedule_sim import SCHEDULES, Costs, simulate_schedule

if TYPE_CHECKING:
    import torch

BUBBLE_TOLERANCE_PP = 3.0  # |measured - expected| bubble, percentage points, every row
SPEEDUP_GOALS: dict[str, float] = {"Interleaved1F1B": 1.15, "ZBVZeroBubble": 1.25}
GOAL_MICROBATCHES = 8  # the speed-up goals are at P = 4, m = 8
_V_PLACEMENT = ("ZBVZeroBubble", "DualPipeV")
_SINGLE = ("GPipe", "1F1B")
_RESULT_TAG = "BENCH_SCHEDULES_RESULT "
_HIDDEN = 4  # every tensor is (micro-batch rows, 4): the work is the sleeps


# ---------------------------------------------------------------------------------- the layer


def _sleep_functions() -> tuple[Any, Any]:
    """The two autograd Functions of `SleepLayer`, built on first use (workers import torch)."""
    import torch

    class ActivationPath(torch.autograd.Function):
        """Identity; its backward sleeps I and passes the gradient through."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, backward_s: float) -> torch.Tensor:
            ctx.backward_s = backward_s
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            time.sleep(ctx.backward_s)
            return grad, None

    class WeightPath(torch.autograd.Function):
        """Broadcasts a parameter to the output's shape (a shape, not a tensor: the input path
        must not run through it); its backward sleeps W and produces the parameter's gradient."""

        @staticmethod
        def forward(
            ctx: Any, weight: torch.Tensor, shape: tuple[int, ...], backward_s: float
        ) -> torch.Tensor:
            ctx.backward_s = backward_s
            return weight.expand(shape).clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            time.sleep(ctx.backward_s)
            return grad.sum(dim=0), None, None

    return ActivationPath, WeightPath


def sleep_layer(forward_s: float, input_grad_s: float, weight_grad_s: float) -> torch.nn.Module:
    """A layer ``y = x + w`` (w starts at zero) whose work is three sleeps.

    * forward: sleeps ``forward_s``;
    * input gradient: ``x`` reaches ``y`` through an identity Function whose backward sleeps
      ``input_grad_s``; ``autograd.grad(y, x)`` (torch's ``stage_backward_input``) runs only it;
    * weight gradient: ``w`` reaches ``y`` through a Function that takes the output's *shape*,
      not ``x``, so it is off the input path; its backward sleeps ``weight_grad_s``, and torch's
      ``stage_backward_weight`` (from the addition, where the two paths meet) runs only it.

    A full backward runs both. Where the input does not require a gradient (the first stage's
    data), the layer differentiates a detached copy anyway, so every layer's backward costs
    I + W: torch runs stage 0's whole backward in its W action.
    """
    import torch

    activation_path, weight_path = _sleep_functions()

    class SleepLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(_HIDDEN))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(forward_s)
            if torch.is_grad_enabled() and not x.requires_grad:
                x = x.detach().requires_grad_()
            through: torch.Tensor = activation_path.apply(x, input_grad_s)
            weight: torch.Tensor = weight_path.apply(self.weight, tuple(x.shape), weight_grad_s)
            return through + weight

        def extra_repr(self) -> str:
            ms = (forward_s * 1e3, input_grad_s * 1e3, weight_grad_s * 1e3)
            return "F={:g} ms, I={:g} ms, W={:g} ms".format(*ms)

    return SleepLayer()


@dataclass(frozen=True)
class SplitCheck:
    """One stage of sleep layers timed pass by pass, seconds, against what the sleeps add to."""

    layers: int
    forward: float
    input_grad: float
    weight_grad: float
    full_backward: float
    first_stage_full_backward: float
    expected_forward: float
    expected_input_grad: float
    expected_weight_grad: float


def check_split(
    layers: int, forward_s: float, input_grad_s: float, weight_grad_s: float
) -> SplitCheck:
    """Time a stage's forward, torch's input and weight passes, and a full backward.

    Uses ``torch.distributed.pipelining._backward`` directly: the functions the schedules call
    for I (``stage_backward_input``), W (``stage_backward_weight``) and B (``stage_backward``).
    """
    import torch
    from torch.distributed.pipelining._backward import (
        stage_backward,
        stage_backward_input,
        stage_backward_weight,
    )

    stage = torch.nn.Sequential(
        *(sleep_layer(forward_s, input_grad_s, weight_grad_s) for _ in range(layers))
    )

    def forward(requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        x = torch.randn(2, _HIDDEN, requires_grad=requires_grad)
        started = time.perf_counter()
        y = stage(x)
        return x, y, time.perf_counter() - started

    x, y, forward_time = forward(True)
    started = time.perf_counter()
    _, param_groups = stage_backward_input([y], [torch.ones_like(y)], [x], stage.parameters())
    input_time = time.perf_counter() - started
    started = time.perf_counter()
    stage_backward_weight(stage.parameters(), param_groups)
    weight_time = time.perf_counter() - started
    if any(p.grad is None for p in stage.parameters()):
        raise RuntimeError("the weight pass left a parameter without a gradient")

    x, y, _ = forward(True)
    started = time.perf_counter()
    stage_backward(y, torch.ones_like(y), [x])
    full_time = time.perf_counter() - started
    x, y, _ = forward(False)
    started = time.perf_counter()
    stage_backward(y, torch.ones_like(y), [x])
    first_time = time.perf_counter() - started
    return SplitCheck(
        layers=layers,
        forward=forward_time,
        input_grad=input_time,
        weight_grad=weight_time,
        full_backward=full_time,
        first_stage_full_backward=first_time,
        expected_forward=layers * forward_s,
        expected_input_grad=layers * input_grad_s,
        expected_weight_grad=layers * weight_grad_s,
    )


# ---------------------------------------------------------------------------------- one rank


@dataclass(frozen=True)
class Config:
    """One measured configuration."""

    schedule: str
    stages_per_rank: int
    placement: str
    n_microbatches: int

    @property
    def key(self) -> str:
        return f"{self.schedule}/v{self.stages_per_rank}/m{self.n_microbatches}"


def _config(schedule: str, n_microbatches: int, loop_stages_per_rank: int) -> Config:
    if schedule in _SINGLE:
        return Config(schedule, 1, "-", n_microbatches)
    if schedule in _V_PLACEMENT:
        return Config(schedule, 2, "v", n_microbatches)
    return Config(schedule, loop_stages_per_rank, "loop", n_microbatches)


def _stage_ids(config: Config, rank: int, ranks: int) -> list[int]:
    if config.placement == "v":
        return [rank, 2 * ranks - 1 - rank]
    return [rank + s * ranks for s in range(config.stages_per_rank)]


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def _layers(args: argparse.Namespace, ranks: int) -> list[torch.nn.Module]:
    """The layer list: F, I and W per rank share, spread over ``args.layers`` layers."""
    share = ranks / args.layers
    return [
        sleep_layer(
            args.forward_ms * share / 1e3, args.input_ms * share / 1e3, args.weight_ms * share / 1e3
        )
        for _ in range(args.layers)
    ]


class _TorchRunner:
    """The schedule built directly on torch.distributed.pipelining (no pipestack)."""

    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import get_schedule_class

        rank, ranks = dist.get_rank(), dist.get_world_size()
        num_stages = ranks * config.stages_per_rank
        per_stage = args.layers // num_stages
        layers = _layers(args, ranks)
        ids = _stage_ids(config, rank, ranks)
        self.modules = [
            torch.nn.Sequential(*layers[s * per_stage : (s + 1) * per_stage]) for s in ids
        ]
        stages = [
            PipelineStage(module, s, num_stages, torch.device("cpu"))
            for module, s in zip(self.modules, ids, strict=True)
        ]
        cls = get_schedule_class(config.schedule)
        stage_arg: Any = stages[0] if config.schedule in _SINGLE else stages
        self.schedule = cls(stage_arg, n_microbatches=config.n_microbatches, loss_fn=_mse)
        self.first = 0 in ids
        self.last = num_stages - 1 in ids

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        kwargs: dict[str, Any] = {"return_outputs": False}
        if self.last:
            kwargs.update(target=y, losses=[])
        self.schedule.step(*((x,) if self.first else ()), **kwargs)
        for module in self.modules:
            module.zero_grad(set_to_none=True)


class _PipestackRunner:
    """The same through pipestack: PipelineModule with virtual stages and PipelineTrainer."""

    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        import torch
        import torch.distributed as dist

        from pipemodule import PipelineModule, PipelineTrainer

        ranks = dist.get_world_size()
        options: dict[str, Any] = {}
        if config.stages_per_rank > 1:
            options = {
                "stages_per_rank": config.stages_per_rank,
                "stage_placement": config.placement,
            }
        self.model = PipelineModule(
            _layers(args, ranks),
            num_stages=ranks,
            loss_fn=_mse,
            partition_method="uniform",
            **options,
        )
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)
        self.trainer = PipelineTrainer(
            self.model, optimizer, n_microbatches=config.n_microbatches, schedule=config.schedule
        )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.trainer.train_step(x, y)


def pipestack_has_virtual_stages() -> bool:
    """Whether this checkout's PipelineModule takes ``stages_per_rank``."""
    import inspect

    from pipemodule import PipelineModule

    return "stages_per_rank" in inspect.signature(PipelineModule.__init__).parameters


def run_rank(args: argparse.Namespace) -> None:
    """Every configuration, ``args.rounds`` times; rank 0 prints the step times as JSON."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    configs = [
        _config(s, m, args.loop_stages_per_rank) for m in args.microbatches for s in args.schedules
    ]
    times: dict[str, list[float]] = {config.key: [] for config in configs}
    runner_class = _PipestackRunner if args.api == "pipestack" else _TorchRunner
    for _ in range(args.rounds):
        for config in configs:
            generator = torch.Generator().manual_seed(0)
            rows = config.n_microbatches * args.microbatch_rows
            x = torch.randn(rows, _HIDDEN, generator=generator)
            y = torch.randn(rows, _HIDDEN, generator=generator)
            runner = runner_class(config, args)
            for step in range(args.warmup + args.steps):
                dist.barrier()
                started = time.perf_counter()
                runner.step(x, y)
                dist.barrier()
                if step >= args.warmup:
                    times[config.key].append(time.perf_counter() - started)
            del runner
    if dist.get_rank() == 0:
        print(_RESULT_TAG + json.dumps(times), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Row:
    """One configuration's measurement beside its simulation."""

    schedule: str
    stages_per_rank: int
    placement: str
    n_microbatches: int
    step_s: float
    steps_s: list[float]
    ideal_s: float
    measured_bubble: float
    expected_bubble: float
    expected_step_s: float
    speedup: float | None
    expected_speedup: float | None


def _costs(args: argparse.Namespace) -> Costs:
    return Costs(args.forward_ms / 1e3, args.input_ms / 1e3, args.weight_ms / 1e3)


def build_rows(args: argparse.Namespace, times: dict[str, list[float]], ranks: int) -> list[Row]:
    costs = _costs(args)
    rows: list[Row] = []
    for m in args.microbatches:
        baseline = _config("1F1B", m, args.loop_stages_per_rank)
        base_measured = statistics.median(times[baseline.key]) if baseline.key in times else None
        base_expected = simulate_schedule("1F1B", ranks, m, costs).makespan
        for schedule in args.schedules:
            config = _config(schedule, m, args.loop_stages_per_rank)
            step = statistics.median(times[config.key])
            simulation = simulate_schedule(schedule, ranks, m, costs, config.stages_per_rank)
            ideal = simulation.ideal
            rows.append(
                Row(
                    schedule=schedule,
                    stages_per_rank=config.stages_per_rank,
                    placement=config.placement,
                    n_microbatches=m,
                    step_s=step,
                    steps_s=times[config.key],
                    ideal_s=ideal,
                    measured_bubble=1.0 - ideal / step,
                    expected_bubble=simulation.bubble,
                    expected_step_s=simulation.makespan,
                    speedup=None if base_measured is None else base_measured / step,
                    expected_speedup=base_expected / simulation.makespan,
                )
            )
    return rows


def print_table(rows: Sequence[Row]) -> None:
    print(
        "| schedule | V | placement | m | step s (median) | ideal s | measured bubble "
        "| expected bubble | difference | speed-up over 1F1B (expected) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        speedup = "-" if row.speedup is None else f"{row.speedup:.3f}x"
        difference = (row.measured_bubble - row.expected_bubble) * 100
        print(
            f"| {row.schedule} | {row.stages_per_rank} | {row.placement} | {row.n_microbatches} "
            f"| {row.step_s:.3f} | {row.ideal_s:.3f} | {row.measured_bubble:.1%} "
            f"| {row.expected_bubble:.1%} | {difference:+.1f} pp "
            f"| {speedup} ({row.expected_speedup:.3f}x) |"
        )


def verdicts(rows: Sequence[Row]) -> list[tuple[str, bool]]:
    """The issue's goals, each with whether it holds."""
    checks: list[tuple[str, bool]] = []
    worst = max(rows, key=lambda r: abs(r.measured_bubble - r.expected_bubble))
    gap = abs(worst.measured_bubble - worst.expected_bubble) * 100
    checks.append(
        (
            f"every measured bubble within {BUBBLE_TOLERANCE_PP:g} pp of the expected one: worst "
            f"{gap:.1f} pp ({worst.schedule}, m={worst.n_microbatches})",
            gap <= BUBBLE_TOLERANCE_PP,
        )
    )
    for schedule, goal in SPEEDUP_GOALS.items():
        for row in rows:
            if row.schedule == schedule and row.n_microbatches == GOAL_MICROBATCHES:
                if row.speedup is None:
                    continue
                checks.append(
                    (
                        f"{schedule} (V={row.stages_per_rank}) over 1F1B at "
                        f"m={GOAL_MICROBATCHES}: {row.speedup:.3f}x (goal >= {goal}x, "
                        f"expected {row.expected_speedup:.3f}x)",
                        row.speedup >= goal,
                    )
                )
    return checks


def launch(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, list[float]]:
    """One torchrun job running every configuration; its step times by configuration."""
    from pipetopo.testing import run_torchrun

    result = run_torchrun(
        __file__,
        args.ranks,
        [*argv, "--worker", "--api", args.api],
        timeout=args.timeout,
        per_rank_stdout=True,
        env={"OMP_NUM_THREADS": "1"},
    )
    if result.timed_out:
        raise RuntimeError(f"torchrun ran past {args.timeout:.0f} s\n{result.stderr[-3000:]}")
    for line in (result.rank_stdout[0] if result.rank_stdout else result.stdout).splitlines():
        if line.startswith(_RESULT_TAG):
            times: dict[str, list[float]] = json.loads(line[len(_RESULT_TAG) :])
            return times
    raise RuntimeError(
        f"torchrun exited with {result.returncode} and no result\n{result.stderr[-4000:]}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ranks", type=int, default=4, help="pipeline ranks P (default 4)")
    parser.add_argument(
        "-m", "--microbatches", type=int, nargs="+", default=[8, 16], help="default: 8 16"
    )
    parser.add_argument(
        "--schedules",
        nargs="+",
        choices=SCHEDULES,
        default=list(SCHEDULES),
        metavar="NAME",
        help=f"default: {' '.join(SCHEDULES)}",
    )
    parser.add_argument(
        "--loop-stages-per-rank",
        type=int,
        default=2,
        help="V for Interleaved1F1B, LoopedBFS, InterleavedZeroBubble (default 2; V schedules: 2)",
    )
    parser.add_argument("--layers", type=int, default=8, help="sleep layers in all (default 8)")
    parser.add_argument("--forward-ms", type=float, default=150.0, help="F per rank share (150)")
    parser.add_argument("--input-ms", type=float, default=150.0, help="I per rank share (150)")
    parser.add_argument("--weight-ms", type=float, default=150.0, help="W per rank share (150)")
    parser.add_argument("--microbatch-rows", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per round (1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all configs (2)")
    parser.add_argument(
        "--api",
        choices=("auto", "torch", "pipestack"),
        default="auto",
        help="build through pipestack (PipelineModule stages_per_rank + PipelineTrainer) or "
        "torch.distributed.pipelining directly; auto: pipestack where it has virtual stages",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the job")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="m = 8, sleeps of 15 ms, one round: a smoke test"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.microbatches, args.rounds, args.steps = [8], 1, 2
        args.forward_ms = args.input_ms = args.weight_ms = 15.0
    if args.worker:
        run_rank(args)
        return 0
    if min(args.ranks, args.layers, args.warmup + 1, args.steps, args.rounds) < 1:
        parser.error("--ranks, --layers, --steps and --rounds must be at least 1")
    for schedule in args.schedules:
        v = _config(schedule, 8, args.loop_stages_per_rank).stages_per_rank
        if args.layers % (args.ranks * v):
            parser.error(f"--layers {args.layers} does not split into {args.ranks} x {v} stages")
    if args.api == "auto":
        args.api = "pipestack" if pipestack_has_virtual_stages() else "torch"
    if "1F1B" not in args.schedules:
        print("(1F1B not measured: no measured speed-ups)")

    per_layer = args.ranks / args.layers
    split = check_split(
        args.layers // args.ranks,
        args.forward_ms * per_layer / 1e3,
        args.input_ms * per_layer / 1e3,
        args.weight_ms * per_layer / 1e3,
    )
    print(
        f"Pipeline schedules on sleeping layers: P={args.ranks} ranks (gloo, CPU, "
        f"{os.cpu_count()} CPUs), {args.layers} layers, F={args.forward_ms:g} ms, "
        f"I={args.input_ms:g} ms, W={args.weight_ms:g} ms per rank share (divided by V), "
        f"built with {'pipestack' if args.api == 'pipestack' else 'torch.distributed.pipelining'}; "
        f"median of {args.rounds} x {args.steps} steps after {args.warmup} warm-up per round\n"
    )
    print(
        f"sleep-layer check, one stage of {split.layers} layers (ms, measured / expected): "
        f"forward {split.forward * 1e3:.1f} / {split.expected_forward * 1e3:.1f}, "
        f"input-grad pass {split.input_grad * 1e3:.1f} / {split.expected_input_grad * 1e3:.1f}, "
        f"weight-grad pass {split.weight_grad * 1e3:.1f} / {split.expected_weight_grad * 1e3:.1f}, "
        f"full backward {split.full_backward * 1e3:.1f} / "
        f"{(split.expected_input_grad + split.expected_weight_grad) * 1e3:.1f} "
        f"(input without grad: {split.first_stage_full_backward * 1e3:.1f})\n"
    )
    times = launch(args, argv)
    rows = build_rows(args, times, args.ranks)
    print_table(rows)
    print()
    all_met = True
    for text, met in verdicts(rows):
        print(f"{text}: {'met' if met else 'MISSED'}")
        all_met &= met
    if args.json:
        print(json.dumps({"split_check": asdict(split), "rows": [asdict(row) for row in rows]}))
    if args.quick:
        print("--quick: the goals are for the default sleeps; exit status 0 regardless")
        return 0
    return 0 if all_met else 1


if __name__ == "__main__":
    raise SystemExit(main())
