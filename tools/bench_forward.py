"""Time a stage's forward pass against an ``nn.Sequential`` of the same layers.

A stage's forward is the inner loop of every schedule, so any Python it adds per layer is paid
once per layer, micro-batch and step. The layers are tiny (48 x Linear(64, 64), batch 8) so that
the per-layer overhead, not the arithmetic, is what is measured. Each variant is timed in
alternating rounds in one process (this machine's speed drifts between runs, ratios do not).

    hatch run bench-forward
    hatch run bench-forward --layers 96 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pipemodule import LayerSpec, PipelineModule
from pipetopo.testing import world_of_one

GOAL = 1.05


def _time(forward: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        forward()
    return (time.perf_counter() - start) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=500, help="forward calls per round")
    parser.add_argument("--rounds", type=int, default=9)
    options = parser.parse_args()
    torch.set_num_threads(1)
    specs = [LayerSpec(torch.nn.Linear, options.width, options.width)] * options.layers
    x = torch.randn(options.batch, options.width)
    with world_of_one():
        plain = PipelineModule(specs, num_stages=1, device="cpu")
        seeded = PipelineModule(specs, num_stages=1, device="cpu", seed_layers=True)
        checkpointed = PipelineModule(
            specs, num_stages=1, device="cpu", activation_checkpoint_interval=4
        )
        sequential = torch.nn.Sequential(*(plain.get_submodule(str(i)) for i in range(len(specs))))
        variants: dict[str, Callable[[], object]] = {
            "nn.Sequential": lambda: sequential(x),
            "PipelineModule": lambda: plain(x),
            "seed_layers=True": lambda: seeded(x),
            "checkpoint every 4": lambda: checkpointed(x),
        }
        with torch.no_grad():
            for forward in variants.values():
                _time(forward, 50)  # warm-up
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(options.rounds):
                for name, forward in variants.items():
                    samples[name].append(_time(forward, options.calls))
        torch.testing.assert_close(plain(x), sequential(x))
    base = statistics.median(samples["nn.Sequential"])
    print(
        f"forward of {options.layers} x Linear({options.width}, {options.width}), batch "
        f"{options.batch}; median of {options.rounds} rounds of {options.calls} calls, 1 thread"
    )
    print(f"{'variant':<20} {'us/call':>9} {'us/layer':>9} {'vs nn.Sequential':>17}")
    for name, times in samples.items():
        median = statistics.median(times)
        print(
            f"{name:<20} {median * 1e6:>9.1f} {median * 1e6 / options.layers:>9.2f} "
            f"{median / base:>16.3f}x"
        )
    ratio = statistics.median(samples["PipelineModule"]) / base
    verdict = "meets" if ratio <= GOAL else "misses"
    print(f"PipelineModule / nn.Sequential = {ratio:.3f} ({verdict} the goal <= {GOAL})")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
