"""Per-rank memory and step time of each data-parallel mode, pipe 2 x data 2 on gloo.

One 4-rank job builds the same tied GPT-like model (``gpt_layers(V, H, depth)``) once per
mode: *flatten* (``shard_data_parallel(model, 'replicate', overlap=False)``: one all-reduce of a
flattened copy of every gradient after the schedule, the previous behaviour), *replicate* (DDP,
overlapped with each stage's last backward; the trainer's default), *fsdp* and *zero2* (FSDP2).
Adam, 1F1B, 8 micro-batches per replica. Modes alternate within each round, so load changes hit
them alike; a step's time is the slowest rank's, and the table shows the median over rounds.
Bytes are per rank after a step, DTensors counted by their local shard: parameters, gradients,
Adam's state (what ZeRO shards). The flatten mode also holds a flat copy of the gradients while
it reduces (not in the table).

    hatch run bench-data-parallel
    hatch run bench-data-parallel --quick --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("flatten", "replicate", "fsdp", "zero2")
WORLD, MICROBATCHES, MICRO_BATCH, SEQ, LR = 4, 8, 2, 32, 1e-3
OPTIMIZER_GOAL = 0.55  # fsdp's optimizer state / replicate's, with 2 replicas
_MIB = 2**20


def _worker(vocab: int, hidden: int, depth: int, rounds: int, steps: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F  # noqa: N812

    from pipemodule import PipelineModule, PipelineTrainer, shard_data_parallel
    from pipemodule._gradients import local_bytes
    from pipemodule.examples import gpt_layers

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    trainers: dict[str, PipelineTrainer] = {}
    for mode in MODES:
        torch.manual_seed(0)
        module = PipelineModule(
            gpt_layers(vocab, hidden, depth), num_stages=2, loss_fn=loss, device="cpu"
        )
        if mode == "flatten":
            shard_data_parallel(module, "replicate", overlap=False)
        else:
            shard_data_parallel(module, mode)
        optimizer = torch.optim.Adam(module.parameters(), lr=LR)
        trainers[mode] = PipelineTrainer(module, optimizer, n_microbatches=MICROBATCHES)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (MICROBATCHES * MICRO_BATCH, SEQ + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for trainer in trainers.values():
        trainer.train_step(inputs, targets)  # warm-up: plans and optimizer state exist
    for _ in range(rounds):
        for mode, trainer in trainers.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(inputs, targets)
            dist.barrier()
            times[mode].append((time.perf_counter() - start) / steps)
    memory: dict[str, dict[str, int]] = {}
    for mode, trainer in trainers.items():
        parameters = list(trainer.module.parameters())
        state = [
            value
            for entry in trainer.optimizer.state.values()
            for value in entry.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        memory[mode] = {
            "parameters": sum(local_bytes(p) for p in parameters),
            "gradients": sum(local_bytes(p.grad) for p in parameters if p.grad is not None),
            "optimizer": sum(local_bytes(value) for value in state),
        }
    return {"rank": dist.get_rank(), "times": times, "memory": memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    rounds, steps = (2, 1) if args.quick else (args.rounds, args.steps)

    from pipetopo.testing import spawn_ranks

    results = spawn_ranks(
        _worker, WORLD, args.vocab, args.hidden, args.depth, rounds, steps, timeout=1800
    )
    rows = []
    for mode in MODES:
        # The slowest rank's time per round, then the median over rounds.
        per_round = [max(r["times"][mode][i] for r in results) for i in range(rounds)]
        worst = {
            kind: max(r["memory"][mode][kind] for r in results)
            for kind in ("parameters", "gradients", "optimizer")
        }
        rows.append({"mode": mode, "step_s": statistics.median(per_round), **worst})
    by_mode = {row["mode"]: row for row in rows}
    optimizer_ratio = by_mode["fsdp"]["optimizer"] / by_mode["replicate"]["optimizer"]
    time_ratio = by_mode["replicate"]["step_s"] / by_mode["flatten"]["step_s"]
    if args.json:
        print(
            json.dumps(
                {"rows": rows, "optimizer_ratio": optimizer_ratio, "time_ratio": time_ratio},
                indent=2,
            )
        )
        return 0
    print(
        f"gpt_layers({args.vocab}, {args.hidden}, {args.depth}), pipe 2 x data 2, Adam, 1F1B, "
        f"{MICROBATCHES} micro-batches of {MICRO_BATCH}x{SEQ} per replica; the busiest rank"
    )
    print()
    print("| mode | step s | parameters MiB | gradients MiB | optimizer state MiB |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['mode']} | {row['step_s']:.3f} | {row['parameters'] / _MIB:.2f} | "
            f"{row['gradients'] / _MIB:.2f} | {row['optimizer'] / _MIB:.2f} |"
        )
    print()
    print(
        f"fsdp / replicate optimizer state: {optimizer_ratio:.3f} (goal <= {OPTIMIZER_GOAL}); "
        f"replicate / flatten step time: {time_ratio:.3f} (goal <= 1)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
