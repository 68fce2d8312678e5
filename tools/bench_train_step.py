"""Training step time of pipestack's PipelineTrainer beside DeepSpeed's PipelineEngine.

The same tied GPT-like list in both (``gpt_layers(V, H, 8)``: a tied embedding, 8 residual MLP
blocks, LayerNorm, the tied unembedding), the same seeds (``seed_layers=True``), the same data,
SGD lr 1e-2, no clipping, 8 global micro-batches of 4 sequences, 1F1B. Every run is a fresh
4-rank torchrun job on gloo; frameworks alternate within a row so both see the same machine.
Reported: the slowest rank's median (min) step over the timed steps, tokens/s, and where
pipestack's slowest rank spends its step. DeepSpeed runs only where it is importable
(``DS_BUILD_OPS=0 pip install deepspeed==0.19.8``); it is not a dependency of the project.

    hatch run bench-train-step                 # both sizes, pipe 4 and pipe 2 x data 2
    hatch run bench-train-step --sizes small --repeats 1

It also times the same work in one process with one thread (every layer, every micro-batch,
the SGD step) and reports each row against that time divided by the cores: the limit no
4-rank split of this work can beat on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIZES = {"small": (256, 8000, 64), "medium": (512, 16000, 128)}  # hidden, vocab, sequence
LAYOUTS = {"pipe4": (4, 1), "pipe2xdata2": (2, 2)}
DEPTH, GLOBAL_MICROBATCHES, MICRO_BATCH, LR, SEED = 8, 8, 4, 1e-2, 1234
WORLD = 4
PHASES = (
    "forward",
    "loss",
    "backward",
    "p2p wait",
    "step agreement",
    "tied all-reduce",
    "data-parallel reduction",
    "grad norm",
    "optimizer",
)


@dataclass(frozen=True)
class Run:
    """One framework on one row: every rank's step seconds, and pipestack's phase totals."""

    steps: list[list[float]]
    phases: list[dict[str, float]]

    @property
    def slowest(self) -> list[float]:
        """Per timed step, the slowest rank's time."""
        return [max(times) for times in zip(*self.steps, strict=True)]


def _batches(steps: int, vocab: int, seq: int) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    batch = GLOBAL_MICROBATCHES * MICRO_BATCH
    return [torch.randint(0, vocab, (batch, seq + 1), generator=generator) for _ in range(steps)]


def _loss_fn(vocab: int) -> Callable[[Any, Any], Any]:
    import torch.nn.functional as F  # noqa: N812

    def loss(logits: Any, targets: Any) -> Any:
        return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    return loss


class _Timers:
    """Seconds spent per phase in this process, collected by wrapping the functions that do it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        function = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[phase] += time.perf_counter() - start

        setattr(owner, name, timed)


def _pipestack_worker(hidden: int, vocab: int, seq: int, pipe: int, steps: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.pipelining.schedules as torch_schedules
    import torch.distributed.pipelining.stage as torch_stage

    import pipemodule._training as training
    from pipemodule import PipeDataParallelTopology, PipelineModule, PipelineTrainer
    from pipemodule.examples import gpt_layers

    topology = PipeDataParallelTopology(num_pp=pipe, num_dp=WORLD // pipe)
    timers = _Timers()
    loss = _timed_loss(_loss_fn(vocab), timers)
    model = PipelineModule(
        gpt_layers(vocab, hidden, DEPTH),
        topology=topology,
        loss_fn=loss,
        seed_layers=True,
        base_seed=SEED,
        device="cpu",
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    replicas, replica = model.grid.axis_size("data"), model.grid.axis_rank("data")
    trainer = PipelineTrainer(
        model, optimizer, n_microbatches=GLOBAL_MICROBATCHES // replicas, schedule="1f1b"
    )
    timers.wrap(torch_stage, "stage_backward", "backward")
    timers.wrap(torch_schedules, "_wait_batch_p2p", "p2p wait")
    timers.wrap(training, "agree_on_step", "step agreement")
    timers.wrap(training, "sum_tied_gradients", "tied all-reduce")
    timers.wrap(training, "average_data_parallel_gradients", "data-parallel reduction")
    timers.wrap(training, "global_grad_norm", "grad norm")
    timers.wrap(optimizer, "step", "optimizer")
    forward_started: list[float] = []

    def before(*_: Any) -> None:
        forward_started.append(time.perf_counter())

    def after(*_: Any) -> None:
        timers.totals["forward"] += time.perf_counter() - forward_started.pop()

    for stage in model.stages:
        stage.register_forward_pre_hook(before)
        stage.register_forward_hook(after)
    share = GLOBAL_MICROBATCHES * MICRO_BATCH // replicas
    times = []
    for index, tokens in enumerate(_batches(steps, vocab, seq)):
        mine = tokens[replica * share : (replica + 1) * share]
        if index == 3:
            timers.totals.clear()  # warm-up steps are not counted
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(mine[:, :-1], mine[:, 1:])
        times.append(time.perf_counter() - start)
    timed = times[3:]
    # Forward hooks would also fire for a recomputation in backward: none here (no checkpoints).
    totals = {phase: timers.totals.get(phase, 0.0) / len(timed) for phase in PHASES}
    return {"steps": timed, "phases": totals}


def _timed_loss(loss: Callable[[Any, Any], Any], timers: _Timers) -> Callable[[Any, Any], Any]:
    def timed(logits: Any, targets: Any) -> Any:
        start = time.perf_counter()
        try:
            return loss(logits, targets)
        finally:
            timers.totals["loss"] += time.perf_counter() - start

    return timed


def _deepspeed_worker(hidden: int, vocab: int, seq: int, pipe: int, steps: int) -> dict[str, Any]:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    from pipemodule.examples import FeedForwardBlock, tied_unembed

    deepspeed.init_distributed(dist_backend="gloo")
    layers = [
        TiedLayerSpec("embed", torch.nn.Embedding, vocab, hidden),
        *[LayerSpec(FeedForwardBlock, hidden) for _ in range(DEPTH)],
        LayerSpec(torch.nn.LayerNorm, hidden),
        TiedLayerSpec("embed", torch.nn.Embedding, vocab, hidden, forward_fn=tied_unembed),
    ]
    from deepspeed.runtime.utils import set_random_seed

    model = PipelineModule(
        layers,
        num_stages=pipe,
        loss_fn=_loss_fn(vocab),
        seed_layers=True,
        # DeepSpeed 0.19 hands random.seed a numpy integer here, which Python 3.11 refuses.
        seed_fn=lambda seed: set_random_seed(int(seed)),
        base_seed=SEED,
        partition_method="parameters",
    )
    replicas = WORLD // pipe
    config = {
        "train_batch_size": GLOBAL_MICROBATCHES * MICRO_BATCH,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GLOBAL_MICROBATCHES // replicas,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    replica = engine.grid.get_data_parallel_id()
    share = GLOBAL_MICROBATCHES * MICRO_BATCH // replicas
    times = []
    for tokens in _batches(steps, vocab, seq):
        mine = tokens[replica * share : (replica + 1) * share]
        micro = [
            (chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())
            for chunk in mine.split(MICRO_BATCH)
        ]
        dist.barrier()
        start = time.perf_counter()
        engine.train_batch(data_iter=iter(micro))
        times.append(time.perf_counter() - start)
    return {"steps": times[3:], "phases": {}}


def _single_process_worker(size: str, steps: int) -> None:
    """The same work in one process and one thread: every layer, every micro-batch, SGD."""
    import torch

    from pipemodule.examples import FeedForwardBlock, tied_unembed

    torch.set_num_threads(1)
    hidden, vocab, seq = SIZES[size]
    torch.manual_seed(SEED)
    embedding = torch.nn.Embedding(vocab, hidden)
    middle = torch.nn.Sequential(
        *(FeedForwardBlock(hidden) for _ in range(DEPTH)), torch.nn.LayerNorm(hidden)
    )
    parameters = [*embedding.parameters(), *middle.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=LR)
    loss_fn = _loss_fn(vocab)
    times = []
    for tokens in _batches(steps, vocab, seq):
        start = time.perf_counter()
        for chunk in tokens.split(MICRO_BATCH):
            logits = tied_unembed(embedding, middle(embedding(chunk[:, :-1])))
            (loss_fn(logits, chunk[:, 1:]) / GLOBAL_MICROBATCHES).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"steps": times[3:], "phases": {}}), flush=True)


def _single_process(size: str, steps: int, timeout: float) -> float:
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--single-process", size, str(steps)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"single-process {size} failed:\n{done.stderr[-4000:]}")
    steps_taken: list[float] = json.loads(lines[-1].removeprefix("RESULT "))["steps"]
    return statistics.median(steps_taken)


def worker(framework: str, size: str, layout: str, steps: int) -> None:
    """One rank of one run; prints one JSON line with its timings."""
    import torch.distributed as dist

    hidden, vocab, seq = SIZES[size]
    pipe, _ = LAYOUTS[layout]
    if framework == "pipestack":
        from datetime import timedelta

        dist.init_process_group("gloo", timeout=timedelta(minutes=10))
        result = _pipestack_worker(hidden, vocab, seq, pipe, steps)
    else:
        result = _deepspeed_worker(hidden, vocab, seq, pipe, steps)
    print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _launch(framework: str, size: str, layout: str, steps: int, timeout: float) -> Run:
    from pipetopo.testing import run_torchrun

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = run_torchrun(
        Path(__file__),
        WORLD,
        ["--worker", framework, size, layout, str(steps)],
        timeout=timeout,
        per_rank_stdout=True,
        env=env,
    )
    if result.returncode != 0 or result.timed_out:
        raise RuntimeError(f"{framework} {size} {layout} failed:\n{result.stderr[-4000:]}")
    ranks = [
        json.loads(line.removeprefix("RESULT "))
        for text in result.rank_stdout
        for line in text.splitlines()
        if line.startswith("RESULT ")
    ]
    return Run(steps=[rank["steps"] for rank in ranks], phases=[rank["phases"] for rank in ranks])


def _deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def _row(size: str, layout: str, runs: dict[str, list[Run]]) -> Iterator[str]:
    hidden, vocab, seq = SIZES[size]
    tokens = GLOBAL_MICROBATCHES * MICRO_BATCH * seq
    medians: dict[str, float] = {}
    for framework, framework_runs in runs.items():
        slowest = [t for run in framework_runs for t in run.slowest]
        medians[framework] = statistics.median(slowest)
        yield (
            f"| H {hidden}, V {vocab}, S {seq} | {layout} | {framework} | "
            f"{medians[framework]:.3f} ({min(slowest):.3f}) | {tokens / medians[framework]:,.0f} |"
        )
    if "deepspeed" in medians:
        ratio = medians["pipestack"] / medians["deepspeed"]
        yield f"|  |  | pipestack / DeepSpeed | {ratio:.3f}x | |"


def _breakdown(size: str, layout: str, runs: list[Run]) -> str:
    # The slowest rank of the last run: its mean seconds per step in each phase.
    run = runs[-1]
    rank = max(range(len(run.steps)), key=lambda r: statistics.median(run.steps[r]))
    phases = run.phases[rank]
    step = statistics.mean(run.steps[rank])
    parts = [f"{name} {seconds:.3f}" for name, seconds in phases.items() if seconds > 0.0005]
    other = step - sum(phases.values())
    return f"{size} {layout}, rank {rank}, step {step:.3f} s: " + ", ".join(
        [*parts, f"other {other:.3f}"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--single-process", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=13, help="steps per run, 3 of them warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="runs per framework and row")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--timeout", type=float, default=900)
    options = parser.parse_args()
    if options.worker:
        framework, size, layout, steps = options.worker
        worker(framework, size, layout, int(steps))
        return 0
    if options.single_process:
        _single_process_worker(options.single_process[0], int(options.single_process[1]))
        return 0
    frameworks = ["pipestack"]
    if not options.no_deepspeed and _deepspeed_importable():
        frameworks.append("deepspeed")
    print(
        f"{WORLD} CPU ranks (gloo), 1F1B, {GLOBAL_MICROBATCHES} micro-batches of {MICRO_BATCH} "
        f"sequences, {options.steps - 3} timed steps after 3 warm-up, {options.repeats} "
        f"alternating run(s); slowest rank, median (min) seconds per step; {sys.platform}, "
        f"{os.cpu_count()} CPUs"
    )
    print("| size | layout | framework | step s | tokens/s |\n|---|---|---|---:|---:|")
    breakdowns, limits = [], []
    cores = os.cpu_count() or 1
    for size in options.sizes:
        single = _single_process(size, options.steps, options.timeout)
        for layout in options.layouts:
            runs: dict[str, list[Run]] = {framework: [] for framework in frameworks}
            for _ in range(options.repeats):
                for framework in frameworks:
                    runs[framework].append(
                        _launch(framework, size, layout, options.steps, options.timeout)
                    )
            for line in _row(size, layout, runs):
                print(line, flush=True)
            breakdowns.append(_breakdown(size, layout, runs["pipestack"]))
            mine = statistics.median([t for run in runs["pipestack"] for t in run.slowest])
            limits.append(
                f"{size} {layout}: one process, one thread {single:.3f} s / {cores} cores = "
                f"{single / cores:.3f} s; pipestack {mine:.3f} s = {mine / (single / cores):.2f}x "
                f"the limit"
            )
    print("\npipestack, where the slowest rank's step goes (mean seconds per step):")
    for line in breakdowns:
        print("  " + line)
    print("\nThe single-process limit (the same work in one process with one thread, / cores):")
    for line in limits:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
