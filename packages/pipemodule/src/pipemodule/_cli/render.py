"""The text report: a title, the partition plan's own table with a memory column, a footer."""

from __future__ import annotations

from collections.abc import Sequence

from pipemodule import OPTIMIZER_STATES, format_bytes
from pipemodule._cli.report import Report, counted
from pipepartition import Parameters, PartitionMethod, TypeRegex

__all__ = ["render"]

_NAMES_WIDTH = 60
_TIED_MARK = "*"


def _cost(value: float, method: PartitionMethod) -> str:
    """A stage cost in the unit the method balanced: ``6 layers matching 'Block'``."""
    # pipeplan's methods balance counts (parameters or layers) and it passes no stage speeds,
    # so every stage cost is a whole number.
    whole = int(value)
    if isinstance(method, Parameters):
        return counted(whole, "trainable parameter")
    matching = f" matching {method.pattern!r}" if isinstance(method, TypeRegex) else ""
    return counted(whole, "layer") + matching


def _holders(stages: Sequence[int], ranks: Sequence[int]) -> str:
    if len(stages) == 1:
        return f"stage {stages[0]} only"
    listed = f"stages {', '.join(str(stage) for stage in stages[:-1])} and {stages[-1]}"
    if len(set(ranks)) == 1:
        return f"{listed}, one module on rank {ranks[0]} (counted in each stage)"
    return f"{listed} and counted in each"


def _title(report: Report) -> str:
    layout = report.layout
    plan = layout.plan
    call = ", ".join(f"{key}={value!r}" for key, value in report.arguments.items())
    placed = (
        ""
        if layout.stages_per_rank == 1
        else f" ({layout.placement.pipe_ranks} ranks x {layout.stages_per_rank}, placed "
        f"{layout.placement.kind!r})"
    )
    return (
        f"{report.target}{f'({call})' if call else ''}: {counted(plan.num_layers, 'layer')} "
        f"in {counted(plan.num_stages, 'stage')}{placed}, method {plan.method}, "
        f"optimizer {report.optimizer}"
    )


def _table(report: Report) -> str:
    layout = report.layout
    tied = {index for tie in layout.ties.values() for index in tie.layer_indices}
    names = [
        info.name + _TIED_MARK if index in tied else info.name
        for index, info in enumerate(layout.layer_infos())
    ]
    columns = {"memory": [format_bytes(stage.total_bytes) for stage in report.stages]}
    if report.memory is not None:
        columns["in flight"] = [str(stage.microbatches_in_flight) for stage in report.stages]
        columns["activations"] = [format_bytes(stage.activation_bytes) for stage in report.stages]
        columns["peak"] = [format_bytes(stage.peak_bytes) for stage in report.stages]
    if layout.stages_per_rank > 1:
        columns = {
            "rank": [str(layout.pipe_rank_of(stage)) for stage in range(layout.num_stages)],
            **columns,
        }
    return layout.plan.table(
        extra_columns=columns,
        names=names,
        max_names_width=_NAMES_WIDTH,
    )


def _footer(report: Report) -> list[str]:
    plan = report.layout.plan
    lines = [
        f"bottleneck: stage {report.bottleneck_stage} ({_cost(plan.bottleneck, report.method)});"
        f" imbalance {plan.imbalance:.3f} (1.000 is perfect)",
        f"memory: parameters + gradients + {report.optimizer} state "
        f"({OPTIMIZER_STATES[report.optimizer]} per trainable parameter); activations not "
        "included",
    ]
    memory, options = report.memory, report.activations
    if memory is not None and options is not None:
        shape = ",".join(str(size) for size in options.input_shape)
        dtype = str(options.input_dtype).removeprefix("torch.")
        ckpt = (
            f", checkpointing every {memory.activation_checkpoint_interval} layers"
            if memory.activation_checkpoint_interval
            else ""
        )
        limiting = memory.stages[memory.limiting_stage]
        lines[1] = (
            f"memory: parameters + gradients + {report.optimizer} state "
            f"({OPTIMIZER_STATES[report.optimizer]} per trainable parameter); activations: saved "
            f"for backward per micro-batch ({dtype}[{shape}]) x micro-batches in flight under "
            f"{memory.schedule}, m={memory.n_microbatches}{ckpt}"
        )
        within = (
            ""
            if options.memory_limit is None
            else f" of the limit {format_bytes(options.memory_limit)} per stage "
            f"({limiting.peak_bytes / options.memory_limit:.0%})"
        )
        lines.append(
            f"limiting: stage {limiting.stage} (rank {report.layout.pipe_rank_of(limiting.stage)})"
            f", peak {format_bytes(limiting.peak_bytes)}{within}"
        )
        if report.layout.stages_per_rank > 1:
            peaks = ", ".join(format_bytes(peak) for peak in memory.rank_peak_bytes)
            lines.append(f"rank peaks (all stages of a rank, along its order): {peaks}")
    lines += [
        f"{_TIED_MARK} tied {tie.key!r} ({report.tie_parameters(tie):,} parameters) is held by "
        f"{_holders(tie.stages, [report.layout.pipe_rank_of(s) for s in tie.stages])}"
        for tie in report.layout.ties.values()
    ]
    lines.append(f"model: {report.model_parameters:,} parameters (each tied module once)")
    return lines


def render(report: Report) -> str:
    """The report as text: title, one table row per stage, then the footer lines."""
    return "\n".join([_title(report), _table(report), *_footer(report)])
