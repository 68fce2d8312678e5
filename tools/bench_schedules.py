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
nominal work, ``m * (F + I + W)``; the measured bubble is ``1 - ideal / step``. Two expected
bubbles come from simulating torch's own action order (tools/schedule_sim.py), on the same
ideal:

* nominal costs: the sleeps, free communication, nothing outside the schedule;
* measured costs (the goal's): every timed step is traced on every rank from inside torch's
  runtime (each F / I / W / B computation, each post and wait of a send or receive), and
  simulated with what that step measured: the mean computation time per action kind and
  stage, the runtime's overhead per action, the latency of a message between ranks, and the
  step's time outside the schedule (`StepCosts`); the expected step is the median over steps.

What the nominal expectation misses (sleep overshoot, autograd, gloo, torch's and pipestack's
bookkeeping) is then in both the measured bubble and the expected one, and their difference
is what the simulated order gets wrong. The default sleeps are long (150 ms per rank share) so
that those costs stay small beside the work, as they are for real layers.

    hatch run bench-schedules                     # P = 4, m = 8 and 16, every schedule
    hatch run bench-schedules --quick             # m = 8, 15 ms sleeps, one round (~1 min)
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The repository root, so that tools/ imports as a namespace package here and under torchrun.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.schedule_sim import (
    SCHEDULES,
    Costs,
    MeasuredCosts,
    simulate,
    simulate_schedule,
    torch_order,
)

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


# ---------------------------------------------------------------------------------- the trace


def _clock() -> float:
    # CLOCK_MONOTONIC on Linux is one clock for every process of the machine, so a send's time
    # on one rank and a receive's on another can be subtracted.
    return time.monotonic()


Interval = tuple[float, float]
ActionRecord = tuple[str, int, int, float, float]  # kind, stage, micro-batch, start, end


@dataclass
class RankTrace:
    """One rank's step, as torch's runtime ran it (monotonic seconds).

    ``actions``: every ``F`` (``forward_one_chunk``), ``I`` / ``B`` (``backward_one_chunk``
    without / with the weights), ``W`` (``backward_weight_one_chunk``) and ``L`` (the last
    stage's loss); ``waits``: every wait on sends and receives; ``sends``: when the
    ``SEND_F`` / ``SEND_B`` of ``(stage, micro-batch)`` was posted.
    """

    start: float
    end: float = 0.0
    actions: list[ActionRecord] = field(default_factory=list)
    waits: list[Interval] = field(default_factory=list)
    sends: dict[str, float] = field(default_factory=dict)


def _message(kind: str, stage: int, mb: int) -> str:
    return f"{kind}/{stage}/{mb}"


@dataclass(frozen=True)
class StepCosts:
    """What one step's actions really cost, from the traces of every rank (seconds).

    * ``durations``: mean per ``"<kind><stage>"`` of the stage's computation (the last
      stage's ``F`` includes its loss);
    * ``overhead``: per computation, the rank's time in the schedule that is neither
      computation nor waiting (torch's bookkeeping, posting sends and receives), mean over
      ranks;
    * ``latency``: median, over the messages a rank was already waiting for, of the time from
      the send being posted to the wait returning (0 where no rank ever waited);
    * ``head`` / ``tail``: before rank 0's first computation, and after the last computation
      of any rank until the step's end (splitting micro-batches, pipestack's collectives and
      optimizer step, the final waits on sends): the step's cost outside the schedule.
    """

    durations: dict[str, float]
    overhead: float
    latency: float
    latency_samples: int
    head: float
    tail: float

    def simulation_costs(self) -> MeasuredCosts:
        return MeasuredCosts(
            {(key[0], int(key[1:])): value for key, value in self.durations.items()},
            self.overhead,
        )


def _consumed_message(kind: str, stage: int, mb: int, stage_rank: dict[int, int]) -> str | None:
    """The message from another rank that action ``kind`` of ``(stage, mb)`` waits for."""
    rank = stage_rank[stage]
    if kind == "F" and stage - 1 in stage_rank and stage_rank[stage - 1] != rank:
        return _message("SEND_F", stage - 1, mb)
    if kind in ("I", "B") and stage + 1 in stage_rank and stage_rank[stage + 1] != rank:
        return _message("SEND_B", stage + 1, mb)
    return None


def step_costs(traces: Sequence[RankTrace]) -> StepCosts:
    """Reduce one step's traces (index = rank) to the costs the simulation takes."""
    stage_rank = {a[1]: rank for rank, trace in enumerate(traces) for a in trace.actions}
    sends = {key: t for trace in traces for key, t in trace.sends.items()}
    loss = {
        (stage, mb): end - start
        for trace in traces
        for k, stage, mb, start, end in trace.actions
        if k == "L"
    }
    samples: dict[str, list[float]] = {}
    overheads: list[float] = []
    latencies: list[float] = []
    for trace in traces:
        actions = sorted(trace.actions, key=lambda a: a[3])
        if not actions:
            continue
        computations = [a for a in actions if a[0] != "L"]
        for kind, stage, mb, start, end in computations:
            extra = loss.get((stage, mb), 0.0) if kind == "F" else 0.0
            samples.setdefault(f"{kind}{stage}", []).append(end - start + extra)
        first, last = actions[0][3], max(a[4] for a in actions)
        worked = sum(end - start for *_, start, end in actions)
        waited = sum(max(0.0, min(end, last) - max(start, first)) for start, end in trace.waits)
        overheads.append(max(0.0, last - first - worked - waited) / len(computations))
        previous_end = trace.start
        for kind, stage, mb, start, end in computations:
            message = _consumed_message(kind, stage, mb, stage_rank)
            posted = None if message is None else sends.get(message)
            before = [w for w in trace.waits if previous_end <= w[0] and w[1] <= start]
            # Only a wait that began before the send measures the message: an earlier-posted
            # message was already there, and its wait says nothing about the transfer.
            if posted is not None and before and before[-1][0] < posted:
                latencies.append(max(0.0, before[-1][1] - posted))
            previous_end = end
    first_compute = min(a[3] for a in traces[0].actions)
    last_compute = max(a[4] for trace in traces for a in trace.actions)
    return StepCosts(
        durations={key: statistics.fmean(values) for key, values in samples.items()},
        overhead=statistics.fmean(overheads),
        latency=statistics.median(latencies) if latencies else 0.0,
        latency_samples=len(latencies),
        head=first_compute - traces[0].start,
        tail=traces[0].end - last_compute,
    )


class _Recorder:
    """Times every action of this rank from inside torch's runtime, into :attr:`trace`.

    It wraps the stage methods that every schedule calls for its computations, and the
    runtime's post and wait functions, on the classes and module, so pipestack's stages and
    torch's are timed alike. Nothing is recorded while :attr:`trace` is None.
    """

    def __init__(self) -> None:
        self.trace: RankTrace | None = None
        # id(op) -> (op, message): the op is kept so that its id is not reused before posting.
        self._unposted: dict[int, tuple[Any, str]] = {}

    def begin(self) -> None:
        self._unposted.clear()
        self.trace = RankTrace(start=_clock())

    def end(self) -> RankTrace:
        trace = self.trace
        if trace is None:
            raise RuntimeError("end() without begin()")
        trace.end = _clock()
        self.trace = None
        return trace

    def _action(self, kind: str, stage: int, mb: int, started: float) -> None:
        if self.trace is not None:
            self.trace.actions.append((kind, stage, mb, started, _clock()))

    def install(self) -> None:
        from torch.distributed.pipelining import schedules
        from torch.distributed.pipelining.stage import _PipelineStageBase

        recorder = self
        forward = _PipelineStageBase.forward_one_chunk
        backward = _PipelineStageBase.backward_one_chunk
        backward_weight = _PipelineStageBase.backward_weight_one_chunk
        fwd_sends = _PipelineStageBase.get_fwd_send_ops
        bwd_sends = _PipelineStageBase.get_bwd_send_ops
        compute_loss: Any = schedules._PipelineSchedule._maybe_compute_loss
        post = schedules._batch_p2p
        wait = schedules._wait_batch_p2p

        def timed_forward(stage: Any, mb: int, *args: Any, **kwargs: Any) -> Any:
            started = _clock()
            output = forward(stage, mb, *args, **kwargs)
            recorder._action("F", stage.stage_index, mb, started)
            return output

        def timed_backward(stage: Any, mb: int, *args: Any, **kwargs: Any) -> Any:
            full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
            started = _clock()
            output = backward(stage, mb, *args, **kwargs)
            recorder._action("B" if full else "I", stage.stage_index, mb, started)
            return output

        def timed_backward_weight(stage: Any, mb: int, *args: Any, **kwargs: Any) -> Any:
            started = _clock()
            output = backward_weight(stage, mb, *args, **kwargs)
            recorder._action("W", stage.stage_index, mb, started)
            return output

        def timed_loss(
            schedule: Any, stage: Any, output: Any, targets: Any, mb: int, *args: Any, **kwargs: Any
        ) -> Any:
            started = _clock()
            result = compute_loss(schedule, stage, output, targets, mb, *args, **kwargs)
            if stage.is_last:
                recorder._action("L", stage.stage_index, mb, started)
            return result

        def named_sends(get: Any, kind: str) -> Any:
            def get_ops(stage: Any, mb: int) -> Any:
                ops = get(stage, mb)
                for op in ops:
                    recorder._unposted[id(op)] = (op, _message(kind, stage.stage_index, mb))
                return ops

            return get_ops

        def timed_post(ops: list[Any], *args: Any, **kwargs: Any) -> Any:
            works = post(ops, *args, **kwargs)
            posted = _clock()
            for op in ops:
                found = recorder._unposted.pop(id(op), None)
                if found is not None and recorder.trace is not None:
                    recorder.trace.sends[found[1]] = posted
            return works

        def timed_wait(works: list[Any]) -> None:
            started = _clock()
            wait(works)
            if works and recorder.trace is not None:
                recorder.trace.waits.append((started, _clock()))

        # The runtime looks these up at every call (methods on the class, functions in the
        # module's globals), so replacing them times every schedule built afterwards.
        replacements: list[tuple[object, str, Any]] = [
            (_PipelineStageBase, "forward_one_chunk", timed_forward),
            (_PipelineStageBase, "backward_one_chunk", timed_backward),
            (_PipelineStageBase, "backward_weight_one_chunk", timed_backward_weight),
            (_PipelineStageBase, "get_fwd_send_ops", named_sends(fwd_sends, "SEND_F")),
            (_PipelineStageBase, "get_bwd_send_ops", named_sends(bwd_sends, "SEND_B")),
            (schedules._PipelineSchedule, "_maybe_compute_loss", timed_loss),
            (schedules, "_batch_p2p", timed_post),
            (schedules, "_wait_batch_p2p", timed_wait),
        ]
        for owner, name, replacement in replacements:
            setattr(owner, name, replacement)


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
    """Every configuration, ``args.rounds`` times; rank 0 prints step times and costs as JSON.

    Every timed step is traced on every rank (`_Recorder`) and gathered to rank 0 after the
    step, outside its timing, which reduces it to the step's `StepCosts`.
    """
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    recorder = _Recorder()
    recorder.install()
    rank, ranks = dist.get_rank(), dist.get_world_size()
    configs = [
        _config(s, m, args.loop_stages_per_rank) for m in args.microbatches for s in args.schedules
    ]
    times: dict[str, list[float]] = {config.key: [] for config in configs}
    costs: dict[str, list[dict[str, Any]]] = {config.key: [] for config in configs}
    traces: dict[str, list[list[dict[str, Any]]]] = {config.key: [] for config in configs}
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
                recorder.begin()
                runner.step(x, y)
                dist.barrier()
                trace = recorder.end()
                if step < args.warmup:
                    continue
                gathered: list[RankTrace] | None = [trace] * ranks if rank == 0 else None
                dist.gather_object(trace, gathered, dst=0)
                if gathered is not None:
                    times[config.key].append(trace.end - trace.start)
                    costs[config.key].append(asdict(step_costs(gathered)))
                    traces[config.key].append([asdict(t) for t in gathered])
            del runner
    if rank == 0:
        if args.traces:
            Path(args.traces).write_text(json.dumps(traces))
        print(_RESULT_TAG + json.dumps({"times": times, "costs": costs}), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Row:
    """One configuration's measurement beside its two simulations.

    ``expected_*``: nominal sleeps, free communication. ``measured_cost_*``: every step
    simulated with the costs that step had (`StepCosts`), then the median over steps, like the
    measured step; the goal compares with this one. Both bubbles use the nominal ideal, so they
    differ from the measured bubble only through the step time.
    """

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
    measured_cost_bubble: float
    measured_cost_step_s: float
    measured_work_s: float
    overhead_s: float
    latency_s: float
    outside_s: float
    speedup: float | None
    expected_speedup: float | None


def _costs(args: argparse.Namespace) -> Costs:
    return Costs(args.forward_ms / 1e3, args.input_ms / 1e3, args.weight_ms / 1e3)


@dataclass(frozen=True)
class _MeasuredExpectation:
    step: float
    work: float
    overhead: float
    latency: float
    outside: float


def measured_expectation(
    config: Config, ranks: int, steps: Sequence[StepCosts]
) -> _MeasuredExpectation:
    """Each step's expected time from its own costs (head + simulated schedule + tail); medians."""
    order, _ = torch_order(config.schedule, ranks, config.n_microbatches, config.stages_per_rank)
    expected: list[float] = []
    work: list[float] = []
    for costs in steps:
        simulation = simulate(
            order, costs.simulation_costs(), config.stages_per_rank, costs.latency
        )
        expected.append(costs.head + simulation.makespan + costs.tail)
        work.append(simulation.ideal)
    return _MeasuredExpectation(
        step=statistics.median(expected),
        work=statistics.median(work),
        overhead=statistics.median(c.overhead for c in steps),
        latency=statistics.median(c.latency for c in steps),
        outside=statistics.median(c.head + c.tail for c in steps),
    )


def build_rows(
    args: argparse.Namespace,
    times: dict[str, list[float]],
    costs: dict[str, list[StepCosts]],
    ranks: int,
) -> list[Row]:
    nominal = _costs(args)
    rows: list[Row] = []
    for m in args.microbatches:
        baseline = _config("1F1B", m, args.loop_stages_per_rank)
        base_measured = statistics.median(times[baseline.key]) if baseline.key in times else None
        base_expected = simulate_schedule("1F1B", ranks, m, nominal).makespan
        for schedule in args.schedules:
            config = _config(schedule, m, args.loop_stages_per_rank)
            step = statistics.median(times[config.key])
            simulation = simulate_schedule(schedule, ranks, m, nominal, config.stages_per_rank)
            measured = measured_expectation(config, ranks, costs[config.key])
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
                    measured_cost_bubble=1.0 - ideal / measured.step,
                    measured_cost_step_s=measured.step,
                    measured_work_s=measured.work,
                    overhead_s=measured.overhead,
                    latency_s=measured.latency,
                    outside_s=measured.outside,
                    speedup=None if base_measured is None else base_measured / step,
                    expected_speedup=base_expected / simulation.makespan,
                )
            )
    return rows


def print_table(rows: Sequence[Row]) -> None:
    print(
        "| schedule | V | placement | m | step s (median) | ideal s | measured bubble "
        "| expected: nominal costs | expected: measured costs | difference "
        "| speed-up over 1F1B (expected) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        speedup = "-" if row.speedup is None else f"{row.speedup:.3f}x"
        difference = (row.measured_bubble - row.measured_cost_bubble) * 100
        print(
            f"| {row.schedule} | {row.stages_per_rank} | {row.placement} | {row.n_microbatches} "
            f"| {row.step_s:.3f} | {row.ideal_s:.3f} | {row.measured_bubble:.1%} "
            f"| {row.expected_bubble:.1%} | {row.measured_cost_bubble:.1%} "
            f"| {difference:+.1f} pp | {speedup} ({row.expected_speedup:.3f}x) |"
        )


def print_costs(rows: Sequence[Row]) -> None:
    """Where the measured-cost expectation departs from the nominal one (medians over steps)."""
    print(
        "| schedule | m | nominal step s | busiest rank's measured work s (ideal) "
        "| overhead ms / action | latency ms / message | outside the schedule ms "
        "| expected step s, measured costs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.schedule} | {row.n_microbatches} | {row.expected_step_s:.3f} "
            f"| {row.measured_work_s:.3f} ({row.ideal_s:.3f}) | {row.overhead_s * 1e3:.2f} "
            f"| {row.latency_s * 1e3:.2f} | {row.outside_s * 1e3:.1f} "
            f"| {row.measured_cost_step_s:.3f} |"
        )


def verdicts(rows: Sequence[Row]) -> list[tuple[str, bool]]:
    """The issue's goals, each with whether it holds."""
    checks: list[tuple[str, bool]] = []
    worst = max(rows, key=lambda r: abs(r.measured_bubble - r.measured_cost_bubble))
    gap = abs(worst.measured_bubble - worst.measured_cost_bubble) * 100
    checks.append(
        (
            f"every measured bubble within {BUBBLE_TOLERANCE_PP:g} pp of the one expected from "
            f"the measured costs: worst {gap:.1f} pp ({worst.schedule}, "
            f"m={worst.n_microbatches})",
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


def launch(
    args: argparse.Namespace, argv: Sequence[str]
) -> tuple[dict[str, list[float]], dict[str, list[StepCosts]]]:
    """One torchrun job running every configuration; step times and costs by configuration."""
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
            found = json.loads(line[len(_RESULT_TAG) :])
            costs = {
                key: [StepCosts(**step) for step in steps] for key, steps in found["costs"].items()
            }
            return found["times"], costs
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
        "--traces",
        metavar="PATH",
        help="write every timed step's per-rank action traces there (JSON), to look into a row",
    )
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
    times, costs = launch(args, argv)
    rows = build_rows(args, times, costs, args.ranks)
    print_table(rows)
    print()
    print_costs(rows)
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
