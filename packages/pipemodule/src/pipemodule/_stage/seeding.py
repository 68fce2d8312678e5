"""Seeds for layer construction and for seeded forward passes."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["SeedFn", "Seeding", "default_seed_fn", "layer_init_seed", "seed_torch"]

SeedFn = Callable[[int], object]
"""A function that seeds the random number generators, called with a non-negative int."""

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    # A bijective 64-bit mixer: neighbouring layer indices get unrelated seeds, so layer i's
    # weights never look like a shifted copy of layer i+1's.
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def layer_init_seed(base_seed: int, layer_index: int) -> int:
    """The seed layer ``layer_index`` (a global index) is built from when ``seed_layers=False``.

    It depends only on the agreed ``base_seed`` and the layer's global index, never on the stage
    that builds it, so initial weights are the same for every number of stages.
    """
    mixed = _splitmix64((base_seed & _MASK64) ^ _splitmix64(layer_index))
    # torch.manual_seed accepts up to 2**64 - 1; keep to 63 bits so it is also a valid int64.
    return mixed >> 1


def default_seed_fn(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator when NumPy is installed, and torch.

    Same effect as DeepSpeed's default for ``seed_layers=True``, so the same layers get the same
    weights as under DeepSpeed.
    """
    random.seed(seed)
    try:
        import numpy
    except ImportError:  # numpy is optional
        pass
    else:
        numpy.random.seed(seed % (1 << 32))
    seed_torch(seed)


@functools.cache
def _accelerators_to_seed() -> tuple[Callable[[int], None], ...]:
    # Device availability does not change within a process.
    seeders: list[Callable[[int], None]] = []
    for name in ("cuda", "xpu", "mtia"):
        module = getattr(torch, name, None)
        if module is not None and module.is_available():
            seeders.append(module.manual_seed_all)
    if torch.backends.mps.is_available():
        seeders.append(torch.mps.manual_seed)
    custom = getattr(torch, torch._C._get_privateuse1_backend_name(), None)
    if custom is not None and hasattr(custom, "manual_seed_all"):
        seeders.append(custom.manual_seed_all)
    return tuple(seeders)


def seed_torch(seed: int) -> None:
    """What ``torch.manual_seed(seed)`` does to every generator that can ever produce a number.

    ``torch.manual_seed`` also queues a seed for each absent accelerator (CUDA, XPU, MTIA on a
    CPU machine), and each queued call records the whole Python stack: about 0.5 ms apiece deep
    inside a pipeline schedule, paid before every layer's forward with ``seed_layers=True``.
    Devices that are not available never generate numbers, so seeding the CPU generator and
    the available accelerators' gives the same random streams without that cost.
    """
    seed = int(seed)
    for seed_device in _accelerators_to_seed():
        seed_device(seed)
    torch.default_generator.manual_seed(seed)


@dataclass(frozen=True)
class Seeding:
    """How layers are seeded when they are built and, with ``seed_layers``, when they run.

    Attributes:
        seed_layers: DeepSpeed's mode: ``seed_fn(base_seed + index)`` before building layer
            ``index`` (the seed stays set afterwards) and before each forward of it.
        seed_fn: the seeding function of that mode (default: :func:`default_seed_fn`).
        base_seed: the first seed of that mode.
        init_seed: the seed every rank agreed on (rank 0's torch seed) for the default mode, in
            which each layer is built from :func:`layer_init_seed` of it and the global RNG is
            left untouched.
        device: the device layers are built on; its RNG is forked too when it is a GPU.
    """

    seed_layers: bool
    seed_fn: SeedFn | None
    base_seed: int
    init_seed: int
    device: torch.device

    def seed(self, seed: int) -> None:
        """Seed the RNGs the way ``seed_layers`` does."""
        (self.seed_fn or default_seed_fn)(seed)

    @contextmanager
    def building(self, layer_index: int) -> Iterator[None]:
        """Seed the RNGs to build global layer ``layer_index``."""
        if self.seed_layers:
            self.seed(self.base_seed + layer_index)  # as DeepSpeed: the seed stays set
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            seed_torch(layer_init_seed(self.init_seed, layer_index))
            yield
