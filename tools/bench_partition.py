"""Benchmark pipepartition.partition_balanced on random integer layer costs.

For each size it prints the best time of a few repeats and checks the result's optimality
independently: a plain greedy counts how many parts a bottleneck needs, a binary search over
it gives the optimum (both in packages/pipepartition/tests/pipepartition_reference.py, which
the tests use too), and the ratio column is bottleneck / optimum (1.000 means optimal).
partition_uniform's ratio is shown for context.

Run with ``hatch run bench-partition`` (or ``python tools/bench_partition.py --help``).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipepartition import partition_balanced, partition_uniform

# The reference optimum lives beside the tests that also check partition_balanced with it.
# Neither folder is a package, so its folder goes on the path (mypy sees it as the namespace
# package packages.pipepartition.tests and cannot resolve the plain name).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages/pipepartition/tests"))
from pipepartition_reference import (
    bottleneck,
    least_bottleneck,
    parts_needed,
)

CASES: tuple[tuple[int, int], ...] = ((1_000, 8), (1_000, 64), (10_000, 64), (100_000, 128))


def best_time(weights: list[int], num_parts: int, repeat: int) -> tuple[float, list[int]]:
    best, boundaries = float("inf"), []
    for _ in range(repeat):
        start = time.perf_counter()
        boundaries = partition_balanced(weights, num_parts)
        best = min(best, time.perf_counter() - start)
    return best, boundaries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (best wins)")
    parser.add_argument("--max-weight", type=int, default=1000, help="weights are 1..this")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.max_weight < 1:
        parser.error("--repeat and --max-weight must be at least 1")

    print(
        f"partition_balanced, random integer weights 1..{args.max_weight}, seed {args.seed}, "
        f"best of {args.repeat}; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    header = f"{'layers':>8}  {'stages':>6}  {'seconds':>8}  {'bottleneck':>10}  {'optimum':>10}"
    print(f"{header}  {'ratio':>6}  {'uniform ratio':>13}")
    optimal_everywhere = True
    for case, (num_layers, num_stages) in enumerate(CASES):
        rng = random.Random(args.seed * 1_000_003 + case)
        weights = [rng.randint(1, args.max_weight) for _ in range(num_layers)]
        seconds, boundaries = best_time(weights, num_stages, args.repeat)
        found = int(bottleneck(weights, boundaries))
        best = least_bottleneck(weights, num_stages)
        # Independent proof of optimality: the greedy needs more parts at found - 1.
        optimal = found == best and parts_needed(weights, found - 1) > num_stages
        optimal_everywhere &= optimal
        uniform = int(bottleneck(weights, partition_uniform(num_layers, num_stages)))
        print(
            f"{num_layers:>8}  {num_stages:>6}  {seconds:>8.4f}  {found:>10}  {best:>10}  "
            f"{found / best:>6.3f}  {uniform / best:>13.3f}"
        )
    if not optimal_everywhere:
        print("NOT OPTIMAL: partition_balanced missed the optimum in a case above")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
