"""The bytes autograd saves for backward, per stage and micro-batch, seen on the meta device.

A training forward keeps, until its backward, every tensor some autograd node saved: a
Linear's input, a Tanh's output, an embedding's ids, the log-probabilities of a cross-entropy.
Which tensors those are is autograd's business, not a formula's, so they are counted where
autograd hands them over: ``torch.autograd.graph.saved_tensors_hooks``. Running the stage's
layers on meta under those hooks gives the exact set (shapes and dtypes) without memory; the
same counter, run during a real step, gives the live bytes to compare with (tools/
bench_memory.py).

Activation checkpointing is run as the stage runs it (torch's non-reentrant checkpoint, in
chunks of ``activation_checkpoint_interval`` layers of a stage): its own hooks replace the
saves inside a chunk, and the chunk's inputs are saved through the outer hooks, so what the
counter sees is what a checkpointed stage keeps. Its backward recomputes one chunk of one
micro-batch at a time; that chunk's full saved bytes are the ``recompute_bytes`` a stage needs
on top, during its backward only.

The split backward of the zero-bubble schedules releases a micro-batch's saves in two parts.
torch's input-gradient pass (I, ``stage_backward_input``) keeps the autograd nodes the weight
pass (W) starts from, and with them everything below them; the nodes above (a stage's last
activation, the loss) die when it detaches the stage's outputs. Which part is which is again
autograd's business, so the I pass is run as torch runs it, on meta, and what the counter
still holds afterwards is ``after_input_bytes``. The first stage's I pass computes nothing
(torch runs its whole backward at W), so it keeps everything.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.utils.checkpoint

from pipemodule._layout.layout import PipelineLayout
from pipemodule._layout.shapes import (
    MetaLayer,
    describe_values,
    meta_layer,
    meta_like,
    meta_tensors_only,
)

__all__ = [
    "SavedTensorCounter",
    "StageActivations",
    "chunk_runner",
    "is_checkpointed_chunk",
    "stage_activations",
]

_Key = tuple[int, int, int]


def _storage_id(tensor: torch.Tensor) -> int:
    # The StorageImpl's address: shared by every view of one storage, on meta too (where
    # data_ptr() is 0 for all tensors).
    return int(tensor.untyped_storage()._cdata)


class _Packed:
    """What autograd holds instead of a saved tensor; its death is the tensor's release."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorCounter:
    """Bytes of the tensors autograd saves for backward, live and at their peak, by group.

    Use :meth:`hooks` as a context manager around forward passes. A saved tensor counts
    ``numel * element_size`` bytes from the moment autograd saves it until autograd drops it
    (its backward ran, or the graph was freed); one region of a storage (same storage, offset
    and size) saved by several nodes counts once. Tensors of ``exclude`` (parameters,
    buffers) and views of them are not activations and are not counted. ``group`` (e.g. the
    stage whose forward runs) is the bucket new saves are counted in. A region saved in
    several groups (a stage's output that the next stage on the same rank saves as its
    input) counts in each group that holds it, and once in the totals: each stage holds it,
    the rank allocated it once.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded: set[int] = set()
        self._held: dict[_Key, dict[int, int]] = {}
        """For each saved region, how many saves of it each group holds."""
        self.group = 0
        self.live_bytes: dict[int, int] = {}
        """Live saved bytes per group, now."""
        self.peak_bytes: dict[int, int] = {}
        """The most live saved bytes each group had at once."""
        self.total_live_bytes = 0
        self.total_peak_bytes = 0
        """The most live saved bytes of all groups together at once."""
        self.exclude(exclude)

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never count ``tensors`` or views of them (a layer's parameters and buffers)."""
        self._excluded.update(_storage_id(tensor) for tensor in tensors)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The hooks that count; enter them around the forward passes to count."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = _storage_id(tensor)
        if storage in self._excluded:
            return tensor
        size = tensor.numel() * tensor.element_size()
        key = (storage, int(tensor.storage_offset()), size)
        # Detached: a saved output kept with its grad_fn would hold its own autograd node
        # (packed -> tensor -> grad_fn -> saved variable -> packed), a cycle that only a full
        # backward breaks; the split backward of the zero-bubble schedules would leak it.
        packed = _Packed(tensor.detach())
        group = self.group
        holders = self._held.setdefault(key, {})
        if not holders:
            self._change_total(size)
        held = holders.get(group, 0)
        holders[group] = held + 1
        if held == 0:
            self._change(group, size)
        weakref.finalize(packed, self._release, key, group, size)
        return packed

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        tensor: torch.Tensor = packed.tensor if isinstance(packed, _Packed) else packed
        return tensor

    def _release(self, key: _Key, group: int, size: int) -> None:
        holders = self._held[key]
        held = holders[group] - 1
        if held:
            holders[group] = held
            return
        del holders[group]
        self._change(group, -size)
        if not holders:
            del self._held[key]
            self._change_total(-size)

    def _change(self, group: int, delta: int) -> None:
        live = self.live_bytes.get(group, 0) + delta
        self.live_bytes[group] = live
        self.peak_bytes[group] = max(self.peak_bytes.get(group, 0), live)

    def _change_total(self, delta: int) -> None:
        self.total_live_bytes += delta
        self.total_peak_bytes = max(self.total_peak_bytes, self.total_live_bytes)


@dataclass(frozen=True)
class StageActivations:
    """What one stage saves for backward per micro-batch, from the meta run.

    ``saved_bytes``: the bytes it keeps from a micro-batch's forward until its backward
    (with checkpointing: the chunks' inputs, plus what unchecked layers save), the loss's own
    saves included on the last stage when a loss was given. ``recompute_bytes``: the largest
    checkpointed chunk's saves, rebuilt for one micro-batch during its backward (0 without
    checkpointing). ``after_input_bytes``: what of ``saved_bytes`` is still held after the
    input-gradient pass of a split backward, until the weight pass (None when not asked for).
    """

    stage: int
    saved_bytes: int
    recompute_bytes: int = 0
    after_input_bytes: int | None = None


def is_checkpointed_chunk(layers: Sequence[MetaLayer], classes: Sequence[str] | None) -> bool:
    # The rule of _stage/forward.py: a chunk is checkpointed when its classes are all listed,
    # or (no list) when any of its modules has parameters.
    modules = [layer.module for layer in layers]
    if classes is not None:
        return all(type(module).__name__ in classes for module in modules)
    return any(
        module is not None and next(module.parameters(), None) is not None for module in modules
    )


def chunk_runner(layers: Sequence[MetaLayer]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        x: Any = args[0] if len(args) == 1 else args
        for layer in layers:
            x = layer.call(x)
        return x

    return run


def _counted(
    run: Callable[..., Any], args: tuple[Any, ...], exclude: Iterable[torch.Tensor]
) -> tuple[Any, int]:
    counter = SavedTensorCounter(exclude)
    with counter.hooks():
        out = run(*args)
    return out, counter.total_live_bytes


def _output_tensors(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)):
        return [tensor for item in outputs for tensor in _output_tensors(item)]
    return []


def _after_input_pass(
    counter: SavedTensorCounter,
    inputs: tuple[Any, ...],
    outputs: Any,
    loss: torch.Tensor | None,
    weights: list[torch.Tensor],
) -> int:
    """Saved bytes still held after torch's input-gradient pass over one stage's graph."""
    from torch.distributed.pipelining._backward import stage_backward_input

    tensors = _output_tensors(outputs)
    roots = [loss] if loss is not None else tensors
    grads = None if loss is not None else [torch.empty_like(tensor) for tensor in tensors]
    # The meta parameters are plain tensors; torch reads only their autograd nodes.
    params = cast("Iterator[torch.nn.Parameter]", iter(weights))
    _, param_groups = stage_backward_input(roots, grads, _output_tensors(inputs), params)
    if loss is not None:
        # The last stage also detaches its outputs after I (PipelineStage.backward_one_chunk).
        for tensor in tensors:
            if not tensor._is_view():
                tensor.detach_()
    kept = counter.total_live_bytes
    del param_groups  # W's graph: only now may the rest go
    return kept


def stage_activations(
    layout: PipelineLayout,
    sample: Any,
    *,
    activation_checkpoint_interval: int = 0,
    checkpointable_layers: Sequence[str] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    labels: Any = None,
    split_backward: bool = False,
) -> tuple[StageActivations, ...]:
    """Each stage's saved-for-backward bytes per micro-batch, for a first-layer input ``sample``.

    ``sample`` is one micro-batch (meta or real tensors; values are never read). Each stage
    runs on meta as in training: its received floating inputs require grad, its layers run in
    chunks of ``activation_checkpoint_interval`` under torch's checkpoint when it is > 0
    (``checkpointable_layers`` as PipelineModule takes it). With ``loss_fn`` and ``labels``
    (one micro-batch of them) the last stage also counts what the loss saves. With
    ``split_backward`` each stage also runs torch's input-gradient pass on meta and reports
    what it keeps for the weight pass (``after_input_bytes``).

    Raises:
        RuntimeError: a layer or the loss fails on the meta device.
    """
    interval = activation_checkpoint_interval
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise ValueError(
            f"activation_checkpoint_interval={interval!r} must be an int >= 0 (0 disables)"
        )
    x: Any = meta_like(sample, requires_grad=False)
    tied: dict[str, torch.nn.Module] = {}
    found: list[StageActivations] = []
    with meta_tensors_only():
        for stage in range(layout.num_stages):
            indices = layout.layers_of(stage)
            layers = [meta_layer(layout, index, tied) for index in indices]
            state = [tensor for layer in layers for tensor in layer.state]
            inputs = x if isinstance(x, tuple) else (x,)
            counter = SavedTensorCounter(state)
            recompute = 0
            step = interval if interval > 0 else len(layers)
            with counter.hooks():
                for start in range(0, len(layers), step):
                    chunk = layers[start : start + step]
                    args = x if isinstance(x, tuple) else (x,)
                    try:
                        if interval > 0 and is_checkpointed_chunk(chunk, checkpointable_layers):
                            # The chunk's own saves, as its backward recomputes them (inner
                            # hooks win: the outer counter does not see this trial run).
                            _, full = _counted(chunk_runner(chunk), args, state)
                            recompute = max(recompute, full)
                            x = torch.utils.checkpoint.checkpoint(
                                chunk_runner(chunk), *args, use_reentrant=False
                            )
                        else:
                            x = chunk_runner(chunk)(*args)
                    except Exception as error:
                        first = indices[start]
                        raise RuntimeError(
                            f"layers {first}..{first + len(chunk) - 1} of stage {stage} failed "
                            f"on the meta device for input {describe_values(args)}: {error}; "
                            f"a forward must run on any device (create tensors with "
                            f"device=x.device)"
                        ) from error
                loss: Any = None  # kept until counted: its graph holds the loss's saves
                if loss_fn is not None and stage == layout.num_stages - 1:
                    outputs = x
                    try:
                        loss = loss_fn(outputs, meta_like(labels, requires_grad=False))
                    except Exception as error:
                        raise RuntimeError(
                            f"loss_fn failed on the meta device for outputs "
                            f"{describe_values(outputs)} and labels {describe_values(labels)}: "
                            f"{error}; pass a loss that runs on any device, or no loss_fn"
                        ) from error
            saved = counter.total_live_bytes
            received = meta_like(x)  # the next stage's fresh leaves, as a receive makes them
            after_input: int | None = None
            if split_backward:
                after_input = saved
                if stage > 0:
                    weights = [tensor for tensor in state if tensor.requires_grad]
                    try:
                        after_input = _after_input_pass(counter, inputs, x, loss, weights)
                    except Exception as error:
                        raise RuntimeError(
                            f"torch's input-gradient pass (stage_backward_input) failed on "
                            f"the meta device for stage {stage}: {error}; a split-backward "
                            f"schedule needs a backward that runs on any device, or use a "
                            f"schedule with a full backward (e.g. '1f1b', 'interleaved1f1b')"
                        ) from error
            found.append(StageActivations(stage, saved, recompute, after_input))
            del loss
            x = received
    return tuple(found)
