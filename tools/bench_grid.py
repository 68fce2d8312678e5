"""Time PipelineParallelGrid construction per rank in large simulated worlds.

Every rank of a job builds the whole grid, so the cost that matters is one rank's. For each
world size, a few sampled ranks each build a pipe x data x model grid in a fresh process (torch's
fake process group: groups are created, nothing is communicated), and the slowest is reported.

    hatch run bench-grid                      # 1,024 / 4,096 / 16,384 ranks, pipe 16, model 4
    hatch run bench-grid --worlds 65536 --samples 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

TARGET_SECONDS = 2.0


@dataclass(frozen=True)
class Measurement:
    """One rank's grid construction."""

    seconds: float
    collective_calls: int
    local_calls: int
    peak_rss_mib: float
    rss_growth_mib: float


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(world_size: int, rank: int, pipe: int, model: int) -> Measurement:
    """Build the grid as ``rank`` of a simulated world; runs in the current process."""
    from pipetopo import PipelineParallelGrid, PipeModelDataParallelTopology
    from pipetopo.testing import fake_world

    topology = PipeModelDataParallelTopology(
        num_pp=pipe, num_mp=model, num_dp=world_size // (pipe * model)
    )
    with fake_world(world_size, rank):
        before = _peak_rss_mib()
        started = time.perf_counter()
        grid = PipelineParallelGrid(topology)
        seconds = time.perf_counter() - started
        after = _peak_rss_mib()
        return Measurement(
            seconds=seconds,
            collective_calls=grid.group_creation_calls,
            local_calls=grid.local_group_creation_calls,
            peak_rss_mib=after,
            rss_growth_mib=after - before,
        )


def _measure_in_subprocess(world_size: int, rank: int, pipe: int, model: int) -> Measurement:
    command = [sys.executable, __file__, "--measure", str(world_size), str(rank)]
    command += ["--pipe", str(pipe), "--model", str(model)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return Measurement(**json.loads(output.strip().splitlines()[-1]))


def _sampled_ranks(world_size: int, samples: int) -> list[int]:
    """First, last and evenly spaced ranks in between."""
    if samples <= 1:
        return [world_size - 1]
    step = (world_size - 1) / (samples - 1)
    return sorted({round(i * step) for i in range(samples)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--pipe", type=int, default=16, help="pipeline stages")
    parser.add_argument("--model", type=int, default=4, help="tensor slices; data is the rest")
    parser.add_argument("--samples", type=int, default=3, help="ranks measured per world")
    parser.add_argument("--measure", type=int, nargs=2, metavar=("WORLD", "RANK"), help="internal")
    args = parser.parse_args(argv)
    pipe: int = args.pipe
    model: int = args.model

    if args.measure is not None:
        world_size, rank = args.measure
        result = measure(world_size, rank, pipe, model)
        print(json.dumps(result.__dict__))
        return 0

    for world_size in args.worlds:
        if world_size % (pipe * model):
            parser.error(f"world size {world_size} is not a multiple of pipe x model")
    print(
        f"PipelineParallelGrid construction, one rank, fake process group "
        f"(slowest of {args.samples} sampled ranks, each in a fresh process)\n"
    )
    print(
        "| world | topology (pipe x data x model) | seconds per rank | groups created "
        "(collective + local) | peak RSS MiB | RSS growth MiB |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    worst = 0.0
    for world_size in args.worlds:
        ranks = _sampled_ranks(world_size, args.samples)
        runs = [_measure_in_subprocess(world_size, r, pipe, model) for r in ranks]
        slowest = max(runs, key=lambda m: m.seconds)
        worst = max(worst, slowest.seconds)
        data = world_size // (pipe * model)
        print(
            f"| {world_size:,} | {pipe} x {data} x {model} | {slowest.seconds:.3f} | "
            f"{slowest.collective_calls:,} + {slowest.local_calls} | "
            f"{max(m.peak_rss_mib for m in runs):.0f} | "
            f"{max(m.rss_growth_mib for m in runs):.1f} |"
        )
    verdict = "met" if worst <= TARGET_SECONDS else "MISSED"
    print(f"\ntarget <= {TARGET_SECONDS:.0f} s per rank: {verdict} (slowest {worst:.3f} s)")
    return 0 if worst <= TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
