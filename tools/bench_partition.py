"""Benchmark pipepartition.partition_balanced on random integer layer costs.

For each size it prints the best time of a few repeats and checks the result's optimality
independently: a plain greedy written here counts how many parts a bottleneck needs, a
binary search over it gives the optimum, and the ratio column is bottleneck / optimum
(1.000 means optimal). partition_uniform's ratio is shown for context.

Run with ``hatch run bench-partition`` (or ``python tools/bench_partition.py --help``).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Sequence

from pipepartition import partition_balanced, partition_uniform

CASES: tuple[tuple[int, int], ...] = ((1_000, 8), (1_000, 64), (10_000, 64), (100_000, 128))


def parts_needed(weights: Sequence[int], limit: int) -> int:
    """Fewest contiguous parts with every part's sum at most ``limit`` (greedy, O(n))."""
    needed, load = 1, 0
    for weight in weights:
        if weight > limit:
            return len(weights) + 1
        if load + weight > limit:
            needed, load = needed + 1, 0
        load += weight
    return needed


def optimum(weights: Sequence[int], num_parts: int) -> int:
    """The smallest achievable bottleneck, by binary search over :func:`parts_needed`."""
    low, high = max(weights) - 1, sum(weights)  # low never suffices, high always does
    while high - low > 1:
        middle = (low + high) // 2
        if parts_needed(weights, middle) <= num_parts:
            high = middle
        else:
            low = middle
    return high


def bottleneck(weights: Sequence[int], boundaries: Sequence[int]) -> int:
    return max(sum(weights[boundaries[s] : boundaries[s + 1]]) for s in range(len(boundaries) - 1))


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
        found = bottleneck(weights, boundaries)
        best = optimum(weights, num_stages)
        # Independent proof of optimality: the greedy needs more parts at found - 1.
        optimal = found == best and parts_needed(weights, found - 1) > num_stages
        optimal_everywhere &= optimal
        uniform = bottleneck(weights, partition_uniform(num_layers, num_stages))
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
