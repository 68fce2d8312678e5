"""What each pipeline stage holds in memory for training, from the layout alone.

A stage holds the parameters of its layers, one gradient per trainable parameter and the
optimizer's state. A tied module is built once on every stage that uses its key, so its memory
is counted on each of those stages: that is what each GPU really holds.

Activations depend on the micro-batch, the schedule and activation checkpointing, so they are
counted only when those are given (:func:`plan_memory`): the bytes autograd saves per
micro-batch on each stage (run on meta, ``activations.py``) times the micro-batches the stage
holds at its peak in torch's own action order (``inflight.py``); under a split backward
(zero-bubble schedules) a micro-batch whose input-gradient pass ran holds only what its weight
pass needs, also measured on meta by running torch's input pass. Not counted: the receive and
gradient buffers PipelineStage allocates per micro-batch at a stage boundary, a stage output
that autograd does not save, temporaries of one forward or backward (gradients in flight,
workspace), the allocator's caching and mixed-precision master copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipemodule._layout.activations import stage_activations
from pipemodule._layout.inflight import schedule_order
from pipespec import LayerInfo, TiedLayerSpec

if TYPE_CHECKING:
    import torch

    from pipemodule._layout.layout import PipelineLayout

__all__ = ["OPTIMIZER_STATES", "MemoryPlan", "StageMemory", "estimate_stage_memory", "plan_memory"]

OPTIMIZER_STATES: Mapping[str, int] = {"adam": 2, "adamw": 2, "sgd": 1, "none": 0}
"""Optimizer state tensors per trainable parameter, each the size of the parameter.

torch's Adam and AdamW keep two moments, SGD with momentum one buffer, plain SGD none.
"""


@dataclass(frozen=True)
class StageMemory:
    """One stage's parameters and the bytes it needs for them during training.

    The activation fields are 0 unless a micro-batch and a schedule were given
    (:func:`plan_memory`): ``saved_bytes_per_microbatch`` is what autograd keeps of one
    micro-batch until its backward, ``microbatches_in_flight`` how many the stage holds at
    its peak, ``recompute_bytes`` what activation checkpointing rebuilds during one backward,
    and ``activation_bytes`` their product plus the recomputation. Under a split backward
    (zero-bubble schedules), ``microbatches_after_input_pass`` of the micro-batches in flight
    had their input-gradient pass and hold only ``saved_bytes_after_input_pass`` each (what
    the weight pass needs) instead of ``saved_bytes_per_microbatch``.
    """

    stage: int
    layers: range
    names: tuple[str, ...]
    parameters: int
    trainable_parameters: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    tied_keys: tuple[str, ...]
    saved_bytes_per_microbatch: int = 0
    microbatches_in_flight: int = 0
    recompute_bytes: int = 0
    saved_bytes_after_input_pass: int = 0
    microbatches_after_input_pass: int = 0

    @property
    def total_bytes(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def activation_bytes(self) -> int:
        """Saved activations at the stage's peak: in flight x per micro-batch + recomputed.

        Micro-batches past their input-gradient pass count their smaller remainder.
        """
        after = self.microbatches_after_input_pass
        before = self.microbatches_in_flight - after
        return (
            before * self.saved_bytes_per_microbatch
            + after * self.saved_bytes_after_input_pass
            + self.recompute_bytes
        )

    @property
    def peak_bytes(self) -> int:
        """The stage's peak: parameters, gradients, optimizer state and saved activations."""
        return self.total_bytes + self.activation_bytes


def _trainable_bytes(info: LayerInfo) -> int:
    # LayerInfo has bytes for all parameters only; splitting them in proportion to the
    # element counts is exact whenever a layer's parameters share one dtype.
    if info.num_params == 0:
        return 0
    return info.param_bytes * info.trainable_params // info.num_params


def estimate_stage_memory(
    layout: PipelineLayout,
    *,
    optimizer_states: int,
    sample: Any = None,
    schedule: str | None = None,
    n_microbatches: int | None = None,
    activation_checkpoint_interval: int = 0,
) -> list[StageMemory]:
    """Per-stage parameters and training bytes of ``layout``.

    Gradients and optimizer state are the size of the trainable parameters at their dtype,
    as torch's optimizers keep them (mixed-precision master copies are not included). The
    layers are described on meta unless the layout already holds their descriptions.
    With ``sample`` (one micro-batch's input to the first layer), ``schedule`` and
    ``n_microbatches`` the stages also count their saved activations: see :func:`plan_memory`,
    whose ``stages`` this returns.
    """
    if sample is not None or schedule is not None or n_microbatches is not None:
        if sample is None or schedule is None or n_microbatches is None:
            raise ValueError(
                "activations need all of sample (one micro-batch's input to the first layer), "
                "schedule and n_microbatches; pass all three, or none for parameter memory only"
            )
        plan = plan_memory(
            layout,
            sample,
            schedule=schedule,
            n_microbatches=n_microbatches,
            optimizer_states=optimizer_states,
            activation_checkpoint_interval=activation_checkpoint_interval,
        )
        return list(plan.stages)
    return _static_memory(layout, optimizer_states)


def _static_memory(layout: PipelineLayout, optimizer_states: int) -> list[StageMemory]:
    if isinstance(optimizer_states, bool) or not isinstance(optimizer_states, int):
        raise TypeError(f"optimizer_states={optimizer_states!r} is not an int; pass e.g. 2 (Adam)")
    if optimizer_states < 0:
        raise ValueError(f"optimizer_states={optimizer_states} is negative; pass an int >= 0")
    infos = layout.layer_infos()
    stages: list[StageMemory] = []
    for stage in range(layout.num_stages):
        indices = layout.layers_of(stage)
        held = [infos[index] for index in layout.held_layers(stage)]
        trainable_bytes = sum(_trainable_bytes(info) for info in held)
        stages.append(
            StageMemory(
                stage=stage,
                layers=indices,
                names=tuple(infos[index].name for index in indices),
                parameters=sum(info.num_params for info in held),
                trainable_parameters=sum(info.trainable_params for info in held),
                parameter_bytes=sum(info.param_bytes for info in held),
                gradient_bytes=trainable_bytes,
                optimizer_bytes=optimizer_states * trainable_bytes,
                tied_keys=tuple(
                    layer.key
                    for layer in (layout.layers[index] for index in layout.held_layers(stage))
                    if isinstance(layer, TiedLayerSpec)
                ),
            )
        )
    return stages


@dataclass(frozen=True)
class MemoryPlan:
    """Each stage's and each pipe rank's peak for one micro-batch shape, schedule and m.

    ``rank_peak_bytes[r]`` is rank r's static bytes (all its stages) plus its saved
    activations at their most along its own action order, plus its largest recomputation;
    with one stage per rank it equals that stage's ``peak_bytes``.
    """

    schedule: str
    n_microbatches: int
    activation_checkpoint_interval: int
    stages: tuple[StageMemory, ...]
    rank_peak_bytes: tuple[int, ...]

    @property
    def limiting_stage(self) -> int:
        """The stage with the highest peak (the first of equals)."""
        peaks = [stage.peak_bytes for stage in self.stages]
        return peaks.index(max(peaks))

    @property
    def limiting_rank(self) -> int:
        """The pipe rank with the highest peak (the first of equals)."""
        return self.rank_peak_bytes.index(max(self.rank_peak_bytes))


def plan_memory(
    layout: PipelineLayout,
    sample: Any,
    *,
    schedule: str,
    n_microbatches: int,
    optimizer_states: int,
    activation_checkpoint_interval: int = 0,
    checkpointable_layers: Sequence[str] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    labels: Any = None,
) -> MemoryPlan:
    """Every stage's training peak under ``schedule`` with ``n_microbatches`` micro-batches.

    ``sample`` is one micro-batch's input to the first layer (meta or real tensors, e.g.
    ``torch.empty(4, 2048, dtype=torch.long, device="meta")``; values are never read).
    A stage's peak is its parameters, gradients and optimizer state, plus the bytes autograd
    saves for one micro-batch (each layer's forward run on meta under saved-tensor hooks)
    times the micro-batches it holds at its peak in torch's action order for ``schedule``
    (1F1B: P - s on stage s, GPipe: m; under the zero-bubble schedules' split backward a
    micro-batch past its input-gradient pass counts what its weight pass keeps), plus, with
    ``activation_checkpoint_interval`` > 0 (as PipelineModule takes it, with
    ``checkpointable_layers``), the largest chunk that its
    backward recomputes. With ``loss_fn`` and ``labels`` (one micro-batch of labels) the last
    stage also counts what the loss saves.

    Example::

        >>> import torch
        >>> from pipemodule import plan_memory, plan_pipeline
        >>> from pipemodule.examples import gpt_layers
        >>> layout = plan_pipeline(gpt_layers(vocab_size=1000, hidden=64, depth=4), num_stages=2)
        >>> ids = torch.empty(2, 128, dtype=torch.long, device="meta")
        >>> plan = plan_memory(layout, ids, schedule="1f1b", n_microbatches=4, optimizer_states=2)
        >>> [stage.microbatches_in_flight for stage in plan.stages]
        [2, 1]

    Raises:
        TypeError: a count or the schedule has the wrong type.
        ValueError: an unknown schedule, a placement or micro-batch count it refuses.
        RuntimeError: a layer or the loss fails on the meta device.
    """
    placement = layout.placement
    order = schedule_order(
        schedule, placement.pipe_ranks, n_microbatches, placement.stages_per_rank
    )
    for rank in range(placement.pipe_ranks):
        if order.stages_of(rank) != layout.stages_of(rank):
            raise ValueError(
                f"schedule {order.schedule!r} runs stages {list(order.stages_of(rank))} on pipe "
                f"rank {rank}, but the layout places {list(layout.stages_of(rank))} there "
                f"({placement!r}); use stage_placement='v' for ZBVZeroBubble and DualPipeV, "
                f"'loop' for the others"
            )
    saved = stage_activations(
        layout,
        sample,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=checkpointable_layers,
        loss_fn=loss_fn,
        labels=labels,
        split_backward=order.splits_backward,
    )
    saved_bytes = [found.saved_bytes for found in saved]
    after_input = [
        found.saved_bytes if found.after_input_bytes is None else found.after_input_bytes
        for found in saved
    ]
    peaks = order.stage_peaks(saved_bytes, after_input)
    stages = tuple(
        dataclasses.replace(
            static,
            saved_bytes_per_microbatch=found.saved_bytes,
            microbatches_in_flight=peaks[static.stage].microbatches,
            recompute_bytes=found.recompute_bytes,
            saved_bytes_after_input_pass=(
                after_input[static.stage] if order.splits_backward else 0
            ),
            microbatches_after_input_pass=peaks[static.stage].after_input_pass,
        )
        for static, found in zip(_static_memory(layout, optimizer_states), saved, strict=True)
    )
    activation_peaks = order.rank_peaks(saved_bytes, after_input)
    rank_peaks = tuple(
        activation_peaks[rank]
        + sum(stages[stage].total_bytes for stage in layout.stages_of(rank))
        + max(stages[stage].recompute_bytes for stage in layout.stages_of(rank))
        for rank in range(placement.pipe_ranks)
    )
    return MemoryPlan(
        schedule=order.schedule,
        n_microbatches=n_microbatches,
        activation_checkpoint_interval=activation_checkpoint_interval,
        stages=stages,
        rank_peak_bytes=rank_peaks,
    )
