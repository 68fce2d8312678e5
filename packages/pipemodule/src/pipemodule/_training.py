"""Training a PipelineModule with torch.distributed.pipelining schedules."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pipemodule._checks import positive_int
from pipemodule._data_parallel import data_parallel_of, gradient_sync, shard_data_parallel
from pipemodule._gradients import (
    average_data_parallel_gradients,
    reshard_stages,
    sum_tied_gradients,
)
from pipemodule._layout.shapes import meta_sample, stage_shapes
from pipemodule._module import PipelineModule
from pipemodule._resume import load_checkpoint, save_checkpoint
from pipemodule._schedules import (
    build_schedule,
    check_loss_on_meta,
)
from pipemodule._step_plan import StepFacts, agree_on_step

__all__ = [
    "NonFiniteGradientsError",
    "PipelineTrainer",
    "average_data_parallel_gradients",
    "clip_grad_norm_",
    "global_grad_norm",
]

logger = logging.getLogger(__name__)


class NonFiniteGradientsError(RuntimeError):
    """Raised on every rank when too many consecutive steps had non-finite gradients."""


def _squares(grad: torch.Tensor) -> torch.Tensor:
    """The sum of squares of ``grad`` as a float64 scalar."""
    flat = grad.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    # A BLAS dot: within ~1e-6 of a float64 sum at a tenth of its cost (a float32 vector_norm
    # drifts by ~1e-4 over 8M elements); tensors are then summed in float64.
    return torch.dot(flat, flat).double()


def global_grad_norm(module: PipelineModule) -> float:
    """The L2 norm of the whole pipeline's gradients, each tensor counted once (see below).

    Collective over the model-parallel group; the same value on every rank of a replica.
    """
    grid = module.grid
    first_slice = "model" not in grid.axes or grid.axis_rank("model") == 0
    squares = torch.zeros((), dtype=torch.float64, device=module.device)
    sharded = torch.zeros((), dtype=torch.float64, device=module.device)
    for p in module.parameters():
        grad = p.grad
        if (
            grad is not None
            and not module.is_tied_copy(p)
            and (first_slice or getattr(p, "tensor_model_parallel", False))
        ):
            if isinstance(grad, DTensor):
                sharded += _squares(grad.to_local())
            else:
                squares += _squares(grad)
    plan = data_parallel_of(module)
    # The mode is the same on every rank (shard_data_parallel compares it), so either every
    # rank of a data group joins this all-reduce of the shards' squares or none does.
    if plan is not None and plan.shards:
        dist.all_reduce(sharded, group=grid.axis_group("data"))
    squares += sharded
    dist.all_reduce(squares, group=grid.replica_group())
    return math.sqrt(float(squares))


def clip_grad_norm_(module: PipelineModule, max_norm: float) -> float:
    """Scale the pipeline's gradients so that their global L2 norm is at most ``max_norm``.

    The norm is taken over the gradients of every stage (all shards of one model replica: the
    grid's model-parallel group, pipe x model), each tensor counted once: a tied tensor on its
    first stage only, and with a ``model`` axis, a tensor that is not split across it (no
    ``tensor_model_parallel`` attribute, Megatron's convention) on model rank 0 only. Call it
    after the gradients are averaged over data-parallel replicas, so every replica sees the same
    norm and takes the same step. Returns the norm before clipping, the same on every rank.
    Collective over the model-parallel group.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} must be > 0")
    total_norm = global_grad_norm(module)
    clip_to(module, max_norm, total_norm)
    return total_norm


def clip_to(module: PipelineModule, max_norm: float, total_norm: float) -> None:
    """Scale every gradient by ``max_norm / total_norm`` when that is below 1 (local)."""
    scale = max_norm / (total_norm + 1e-6)
    if scale < 1.0:
        # Tied copies are scaled too: they must stay identical to their owner.
        for parameter in module.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale)


class PipelineTrainer:
    """One optimizer step of a pipeline per call: schedule, tied sums, data averaging, clipping.

    ``torch.distributed.pipelining`` schedules run forward and backward over micro-batches;
    a training step also needs what a schedule does not do, in this order: sum the gradients of
    tied tensors over the stages holding them, average gradients over data-parallel replicas,
    clip by the global norm, and step the optimizer.

    Every rank calls :meth:`train_step` once per step (collective over the whole grid). Pass
    the data-parallel replica's batch: ``inputs`` matter on the first stage, ``labels`` on the
    last; other ranks may pass them too or leave them ``None``.

    Stage shapes are never inferred from data: before a step the ranks of a pipeline agree on
    the micro-batch shapes (one small collective), and every stage's inputs and outputs are
    planned on the meta device. A batch whose shapes differ from the first one's is planned
    again when the module was built with ``dynamic_shape=True``, and refused otherwise, on every
    rank, before anything is sent.

    Data parallelism is the module's plan (:func:`pipemodule.shard_data_parallel`: 'replicate',
    'fsdp' or 'zero2'); without one, replicas are averaged with DDP per stage. A step whose global
    gradient norm is not finite is skipped on every rank (``skipped_steps``), and
    ``accumulation_steps=k`` takes one optimizer step per k calls.
    """

    _PLANS_KEPT = 8
    """Schedules kept for recent batch shapes, so alternating shapes are planned once each."""

    def __init__(
        self,
        module: PipelineModule,
        optimizer: torch.optim.Optimizer,
        *,
        n_microbatches: int,
        schedule: str = "1f1b",
        max_grad_norm: float | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        return_outputs: bool = False,
        max_consecutive_skips: int | None = 10,
        accumulation_steps: int = 1,
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm={max_grad_norm!r} must be > 0, or None to disable clipping"
            )
        positive_int("accumulation_steps", accumulation_steps)
        if max_consecutive_skips is not None:
            positive_int("max_consecutive_skips", max_consecutive_skips)
        self.module = module
        self.optimizer = optimizer
        self.n_microbatches = n_microbatches
        self.max_grad_norm = max_grad_norm
        self.accumulation_steps = accumulation_steps
        """``train_step`` calls per optimizer step; the loss is the mean over all their
        micro-batches."""
        self.accumulated_calls = 0
        """``train_step`` calls made since the last optimizer step (or skip)."""
        self._loss_fn = loss_fn
        self._step_loss = _accumulated_loss(loss_fn or module.loss_fn, accumulation_steps)
        # Checks the schedule against the module now, on every rank, before any collective;
        # replaced at the first step by one with static stage shapes.
        self.schedule = build_schedule(module, n_microbatches, schedule, self._step_loss)
        if data_parallel_of(module) is None and module.grid.axis_size("data") > 1:
            # The default mode: DDP's overlapped, bucketed average (per-stage buckets under a
            # split backward). It leaves the parameters as they are, so the optimizer made
            # before still holds them.
            shard_data_parallel(module)
            self.schedule = build_schedule(module, n_microbatches, schedule, self._step_loss)
        self._schedule_name = schedule
        self._plans: dict[Any, Any] = {}
        self._first_facts: StepFacts | None = None
        self.lr_scheduler = lr_scheduler
        self.return_outputs = return_outputs
        self.last_outputs: Any = None
        self.last_grad_norm: float | None = None
        self.step_count = 0
        """Optimizer steps taken (restored by :meth:`load_checkpoint`)."""
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        """Steps skipped because the gradients were not finite (inf/NaN), in total."""
        self.consecutive_skips = 0

    def save_checkpoint(self, path: str | os.PathLike[str], **extra_state: Any) -> Path:
        """Save the full training state to ``path``; see :func:`pipemodule.save_checkpoint`."""
        return save_checkpoint(self, path, **extra_state)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Restore the state :meth:`save_checkpoint` wrote; returns the user's extra state."""
        return load_checkpoint(self, path)

    def _arguments(self, inputs: Any, labels: Any) -> dict[str, Any]:
        """What this rank passes to the schedule: inputs for stage 0, labels for the last."""
        facts = agree_on_step(self.module, inputs, labels, self.n_microbatches)
        self.schedule = self._schedule_for(facts)
        call: dict[str, Any] = {"args": ()}
        if self.module.holds_first_stage:
            call["args"] = inputs if isinstance(inputs, tuple) else (inputs,)
        if self.module.holds_last_stage:
            call["target"] = labels
        return call

    def _schedule_for(self, facts: StepFacts) -> Any:
        """The schedule with static shapes for ``facts``, planned on meta alike on every rank."""
        key = (facts.inputs, facts.labels)
        if key in self._plans:
            return self._plans[key]
        first = self._first_facts
        if first is not None and not self.module.dynamic_shape:
            raise ValueError(
                f"the batch changed shape: micro-batches were {first.describe()} and are now "
                f"{facts.describe()}; build the PipelineModule with dynamic_shape=True to plan "
                f"every new shape again (on meta, no extra communication), or pad batches to one "
                f"shape"
            )
        shapes = stage_shapes(self.module.layout, meta_sample(facts.inputs))
        if facts.labels is not None:
            check_loss_on_meta(self._loss_fn or self.module.loss_fn, shapes, facts.labels)
        schedule = build_schedule(
            self.module, self.n_microbatches, self._schedule_name, self._step_loss, shapes=shapes
        )
        if len(self._plans) >= self._PLANS_KEPT:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = schedule
        self._first_facts = first or facts
        return schedule

    def train_step(self, inputs: Any = None, labels: Any = None) -> float:
        """Forward, backward and optimizer step on one batch; returns the mean loss.

        The loss is averaged over micro-batches and data-parallel replicas and returned on every
        rank. With ``return_outputs=True`` the last stage's merged outputs of the step are kept
        in :attr:`last_outputs` (they cost the logits of every micro-batch).

        With ``accumulation_steps=k`` the optimizer steps at every k-th call; the other calls
        only add their gradients, each micro-batch's loss divided by ``k * n_microbatches``, so
        the step follows the mean loss over all micro-batches of the k calls.
        """
        if self.accumulated_calls == 0:
            self.optimizer.zero_grad(set_to_none=False)
        losses: list[torch.Tensor] = []
        call = self._arguments(inputs, labels)
        args = call.pop("args")
        if "target" in call:
            call["losses"] = losses
        # Replicas reduce once per window, at its last call; see [Note: one reduction per
        # accumulation window].
        last_call = self.accumulated_calls + 1 == self.accumulation_steps
        with gradient_sync(self.module, enabled=last_call):
            outputs = self.schedule.step(*args, return_outputs=self.return_outputs, **call)
        self.last_outputs = outputs if self.return_outputs else None
        self.accumulated_calls += 1
        if not last_call:
            # Gradients accumulate locally; the tied sums and the average wait for the step.
            return self._mean_loss(losses)
        self.accumulated_calls = 0
        sum_tied_gradients(self.module)
        average_data_parallel_gradients(self.module)
        norm = global_grad_norm(self.module)
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            # Every rank has the same norm (one all-reduce), so every rank skips together.
            self._skip_step(norm)
            return self._mean_loss(losses)
        self.consecutive_skips = 0
        if self.max_grad_norm is not None:
            clip_to(self.module, self.max_grad_norm, norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.step_count += 1
        return self._mean_loss(losses)

    def _skip_step(self, norm: float) -> None:
        """Drop this step's gradients; raise once too many steps in a row had to be dropped."""
        self.optimizer.zero_grad(set_to_none=False)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        logger.warning(
            "step %d skipped: the gradient norm is %s (%d in a row, %d in all)",
            self.step_count + 1,
            norm,
            self.consecutive_skips,
            self.skipped_steps,
        )
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips >= limit:
            raise NonFiniteGradientsError(
                f"the gradients were not finite (norm {norm}) in {self.consecutive_skips} "
                f"consecutive steps; the parameters are unchanged since the last good step. Lower "
                f"the learning rate, check the data and the loss for inf/NaN, or raise "
                f"max_consecutive_skips (None never raises)"
            )

    def evaluate(self, inputs: Any = None, labels: Any = None) -> float:
        """The mean loss on one batch, without gradients or updates (collective)."""
        losses: list[torch.Tensor] = []
        call = self._arguments(inputs, labels)
        args = call.pop("args")
        if "target" in call:
            call["losses"] = losses
        with torch.no_grad():
            self.schedule.eval(*args, **call)
        reshard_stages(self.module)
        return self._mean_loss(losses)

    def _mean_loss(self, losses: list[torch.Tensor]) -> float:
        # Only the rank of the last stage has losses, each already divided by the micro-batch
        # count (see build_schedule): their sum is the mean. A sum over the pipe group hands
        # it to every stage, and an average over the data group combines the replicas.
        grid = self.module.grid
        total = torch.zeros((), dtype=torch.float64, device=self.module.device)
        if losses:
            total += torch.stack([loss.detach().double() for loss in losses]).sum()
        dist.all_reduce(total, group=grid.axis_group("pipe"))
        if grid.axis_size("data") > 1:
            dist.all_reduce(total, group=grid.axis_group("data"))
            total /= grid.axis_size("data")
        # Each loss was also divided by accumulation_steps (see _accumulated_loss).
        return float(total) * self.accumulation_steps


def _accumulated_loss(
    loss_fn: Callable[[Any, Any], torch.Tensor] | None, accumulation_steps: int
) -> Callable[[Any, Any], torch.Tensor] | None:
    """``loss_fn`` divided by ``accumulation_steps``: torch's per-call ``scale_grads`` cannot
    see calls, so the scaling over calls is in the loss, as the micro-batch scaling is."""
    if loss_fn is None or accumulation_steps == 1:
        return loss_fn

    def accumulated(outputs: Any, target: Any) -> torch.Tensor:
        return loss_fn(outputs, target) / accumulation_steps

    return accumulated
