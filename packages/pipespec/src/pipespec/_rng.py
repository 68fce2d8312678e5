"""Leave every global random number generator as it was found."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restore torch's CPU (and initialised CUDA), Python's and numpy's global RNG on exit.

    Building a module runs its ``__init__``, which may draw random numbers even when its tensors
    land on ``meta``. Describing a layer must not shift the random stream that later seeds real
    weights, or the weights would depend on whether (and how often) a layer was described.
    """
    # Only generators CUDA has already set up: touching others would initialise CUDA here.
    cuda_devices = (
        list(range(torch.cuda.device_count()))
        if torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        else []
    )
    python_state = random.getstate()
    # A numpy not imported yet has no state a caller could have seen, so it is not imported here.
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)
