"""Which device a stage is built on when the caller does not say."""

from __future__ import annotations

import os

import torch

__all__ = ["default_device", "resolve_device"]


def default_device() -> torch.device:
    """The current CUDA device when CUDA is available, else the CPU.

    Under torchrun every process sees every GPU; ``LOCAL_RANK`` picks this process's one (and
    makes it current, so NCCL collectives and ``torch.cuda`` calls agree with it).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    index = (
        int(local_rank) % torch.cuda.device_count() if local_rank else torch.cuda.current_device()
    )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """Turn the user's ``device`` argument into a ``torch.device`` (``None`` -> the default)."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device={device!r} is not a torch device; pass e.g. 'cpu', 'cuda:0' or "
            f"torch.device('cuda', local_rank)"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} asks for CUDA, but this process sees no CUDA device; pass "
            f"device='cpu', or run where torch.cuda.is_available() is True"
        )
    if resolved.type == "meta":
        raise ValueError(
            "device='meta' would build a stage without weights; use pipespec.describe() to inspect "
            "layers without memory, or pass a real device"
        )
    index: int | None = resolved.index  # typed as int by torch, None for a bare "cuda"
    if resolved.type == "cuda" and index is None and torch.cuda.is_available():
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
