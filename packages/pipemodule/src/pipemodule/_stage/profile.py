"""Measuring each layer's forward+backward time for partition_method='profile'."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pipemodule._stage.build import LayerBuilder
from pipemodule._stage.collective import global_rank, run_on_every_rank
from pipemodule._stage.seeding import Seeding
from pipespec import Layer

__all__ = ["measure_layer_costs", "measure_on_first_rank"]


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(item, device) for item in value)
    return value


def _fresh_inputs(value: Any) -> Any:
    # Each measurement starts from leaf tensors so backward stops at this layer.
    if isinstance(value, torch.Tensor):
        leaf = value.detach()
        return leaf.requires_grad_() if leaf.is_floating_point() else leaf
    if isinstance(value, tuple):
        return tuple(_fresh_inputs(item) for item in value)
    return value


def _float_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _float_tensors(item)]
    return []


def _run_once(layer: Callable[[Any], Any], inputs: Any, device: torch.device) -> tuple[float, Any]:
    parameters = list(layer.parameters()) if isinstance(layer, torch.nn.Module) else []
    start = time.perf_counter()
    output = layer(inputs)
    scalar = sum((t.float().sum() for t in _float_tensors(output)), torch.zeros((), device=device))
    wrt = [t for t in [*_float_tensors(inputs), *parameters] if t.requires_grad]
    if scalar.requires_grad and wrt:
        # autograd.grad, not backward(): nothing accumulates in the modules' .grad fields.
        torch.autograd.grad(scalar, wrt, allow_unused=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, output


def measure_layer_costs(
    layers: Sequence[Layer],
    sample_input: Any,
    *,
    device: torch.device,
    build: Callable[[int], Callable[[Any], Any]],
    repeats: int = 3,
) -> list[float]:
    """Median forward+backward seconds of each layer, fed with the previous layer's output.

    Layers are built one at a time by ``build(index)`` and dropped after measurement, so at most
    one layer that this rank does not keep is alive at a time. The global RNG state is restored.
    """
    costs: list[float] = []
    activations = _to_device(sample_input, device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for index in range(len(layers)):
            layer = build(index)
            _run_once(layer, _fresh_inputs(activations), device)  # warm-up
            samples = []
            output: Any = None
            for _ in range(repeats):
                seconds, output = _run_once(layer, _fresh_inputs(activations), device)
                samples.append(seconds)
            costs.append(statistics.median(samples))
            activations = _detach(output)
            del layer, output
    return costs


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(item) for item in value)
    return value


def measure_on_first_rank(
    layers: Sequence[Layer],
    sample_input: Any,
    seeding: Seeding,
    group: dist.ProcessGroup | None,
    tie_layers: Mapping[str, tuple[int, ...]],
) -> list[float]:
    """Every layer's cost, measured on the first rank of ``group`` and shared with the others.

    Collective over ``group``. A measurement that fails raises on every rank, naming the
    measuring rank's error, instead of leaving the others waiting for the times.
    """
    # Built as in the default mode: measuring must leave seed_layers' global RNG state alone.
    first_layers = {key: indices[0] for key, indices in tie_layers.items()}
    builder = LayerBuilder(layers, first_layers, dataclasses.replace(seeding, seed_layers=False))
    measuring_rank = global_rank(group, 0)

    def measure() -> list[float] | None:
        if dist.get_rank() != measuring_rank:
            return None
        return measure_layer_costs(
            layers, sample_input, device=seeding.device, build=lambda i: builder.build(i, {})
        )

    costs = run_on_every_rank("profiling the layers", measure, group)
    shared: list[object] = [costs]
    dist.broadcast_object_list(shared, src=measuring_rank, group=group)
    received = shared[0]
    if not isinstance(received, list):
        raise RuntimeError(f"rank {measuring_rank} sent {received!r} instead of layer times")
    return [float(cost) for cost in received]
