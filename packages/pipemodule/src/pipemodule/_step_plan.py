"""Each training step's batch, checked and agreed on by the ranks of a pipeline before it runs.

A schedule's first send is where a bad batch turns into a hang: the first stage finds that its
inputs do not split, the last that it has no labels, and their peers wait in a receive until
the process group's timeout. So before every step the ranks of one pipeline exchange, in one
small collective, what each was given (the shapes and dtypes of one micro-batch, or what is
wrong with it); then every rank knows the same facts, raises the same error, or plans the
same stage shapes on meta (see ``_layout/shapes.py``).

Batches of one training run nearly always look alike, and that exchange (pickled, two
collectives) cost 6-11 ms a step on gloo. So a rank whose report equals the one it made in the
last exchange says only that, in a 1-element all-reduce: when no rank of the pipeline saw a
change, every rank reuses the facts all agreed on then; when any did (or reported an error),
all run the full exchange. The outcome is the same on every rank either way.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from pipemodule._layout.shapes import describe_values, meta_sample, micro_batch_of
from pipemodule._module import PipelineModule
from pipemodule._stage.collective import PipelineRankError, any_rank, gather_objects

__all__ = ["StepFacts", "agree_on_step"]

Key = Any
"""Shapes and dtypes of one micro-batch: ``((shape, dtype), ...)`` nested like the batch."""


@dataclass(frozen=True)
class StepFacts:
    """What the ranks of one pipeline agreed a step's micro-batches look like."""

    inputs: Key
    labels: Key | None

    def describe(self) -> str:
        return describe_values(meta_sample(self.inputs))


def _key(value: Any) -> Key:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_key(item) for item in value)
    raise TypeError(
        f"a batch of type {type(value).__name__} cannot be split into micro-batches; pass a "
        f"tensor or a tuple of tensors"
    )


def _split_size(name: str, batch: Any, n_microbatches: int) -> None:
    tensors = batch if isinstance(batch, (tuple, list)) else (batch,)
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and (
            tensor.dim() == 0 or tensor.shape[0] % n_microbatches != 0
        ):
            size = "no batch dimension" if tensor.dim() == 0 else f"batch size {tensor.shape[0]}"
            raise ValueError(
                f"{name} has {size}, which does not split into n_microbatches={n_microbatches} "
                f"equal micro-batches; pass a batch whose first dimension is a multiple of "
                f"{n_microbatches}"
            )


def _local_facts(
    module: PipelineModule, inputs: Any, labels: Any, n_microbatches: int
) -> tuple[Key | None, Key | None]:
    if module.holds_first_stage and inputs is None:
        raise ValueError(
            f"inputs=None on the rank holding stage 0 (global rank {module.global_rank}); pass "
            f"this replica's batch there (passing it on every rank is simplest)"
        )
    if module.holds_last_stage and labels is None:
        raise ValueError(
            f"labels=None on the rank holding the last stage (global rank {module.global_rank}); "
            f"the loss needs them there: pass this replica's labels"
        )
    input_key = label_key = None
    if inputs is not None:
        _split_size("inputs", inputs, n_microbatches)
        input_key = _key(micro_batch_of(inputs, n_microbatches))
    if labels is not None:
        _split_size("labels", labels, n_microbatches)
        label_key = _key(micro_batch_of(labels, n_microbatches))
    return input_key, label_key


Report = tuple[Key | None, Key | None, int, str | None]
"""What one rank found: its input and label keys, the micro-batch count, or its error."""

# Per module: this rank's report in the last full exchange and the facts agreed in it.
_last_agreed: weakref.WeakKeyDictionary[PipelineModule, tuple[Report, StepFacts]] = (
    weakref.WeakKeyDictionary()
)


def agree_on_step(
    module: PipelineModule, inputs: Any, labels: Any, n_microbatches: int
) -> StepFacts:
    """Check this rank's batch, exchange over the pipe group, and return what all agree on.

    Collective over the grid's pipe group. A bad batch on any rank raises on every rank of the
    pipeline, naming the rank and the problem, before any stage sends anything.
    """
    report: Report
    try:
        report = (*_local_facts(module, inputs, labels, n_microbatches), n_microbatches, None)
    except (TypeError, ValueError) as error:
        report = (None, None, n_microbatches, f"{type(error).__name__}: {error}")
        local_error: Exception | None = error
    else:
        local_error = None
    group = module.grid.axis_group("pipe")
    last = _last_agreed.get(module)
    unchanged = local_error is None and last is not None and last[0] == report
    if not any_rank(not unchanged, group, module.device, "the step's batch check"):
        assert last is not None  # every rank found its report unchanged, this one too
        return last[1]
    reports = gather_objects(report, group, "the step's batch check")
    ranks = list(module.grid.axis_ranks("pipe"))
    failures = [(ranks[i], text) for i, (*_, text) in enumerate(reports) if text is not None]
    if failures:
        _last_agreed.pop(module, None)
        if local_error is not None:
            raise local_error
        listed = "; ".join(f"rank {rank}: {text}" for rank, text in failures)
        raise PipelineRankError(f"the batch of this step is not usable: {listed}")
    first = module.layout.pipe_rank_of(0)
    final = module.layout.pipe_rank_of(module.layout.num_stages - 1)
    facts = StepFacts(inputs=reports[first][0], labels=reports[final][1])
    for rank, (input_key, *_) in zip(ranks, reports, strict=True):
        if input_key is not None and input_key != facts.inputs:
            _last_agreed.pop(module, None)
            theirs = describe_values(meta_sample(input_key))
            raise ValueError(
                f"ranks of one pipeline were given different inputs: rank {rank} has micro-batches "
                f"{theirs}, the first stage's rank {ranks[first]} has {facts.describe()}; pass "
                f"the same batch to every rank of a pipeline replica"
            )
    _last_agreed[module] = (report, facts)
    return facts
