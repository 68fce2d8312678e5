"""The fixed-width text table that :meth:`PartitionPlan.table` prints."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import TYPE_CHECKING

from pipepartition._numbers import format_number

if TYPE_CHECKING:
    from pipepartition._plan import PartitionPlan

_TIMES = "\u00d7"  # the multiplication sign, as in "24\u00d7Block"


def compress_names(names: Sequence[str]) -> str:
    """``Embedding, 24\u00d7Block, LayerNorm``: consecutive repeats counted, order kept."""
    parts = []
    for name, run in groupby(names):
        repeats = sum(1 for _ in run)
        parts.append(f"{repeats}{_TIMES}{name}" if repeats > 1 else name)
    return ", ".join(parts)


def render_table(plan: PartitionPlan) -> str:
    """One row per stage, then a footer with the bottleneck and the imbalance."""
    headers = ["stage", "layers", "count", "cost"]
    if plan.speeds is not None:
        headers += ["speed", "time"]
    if plan.parameters is not None:
        headers.append("params")
    headers.append("load")
    if plan.names is not None:
        headers.append("names")

    bottleneck = plan.bottleneck
    stage_times = plan.stage_times
    stage_parameters = plan.stage_parameters
    rows: list[list[str]] = []
    for stage, layers in enumerate(plan.stages):
        row = [
            str(stage),
            f"{layers.start}..{layers.stop - 1}" if layers else "-",
            str(len(layers)),
            format_number(plan.stage_costs[stage]),
        ]
        if plan.speeds is not None:
            row += [format_number(plan.speeds[stage]), format_number(stage_times[stage])]
        if stage_parameters is not None:
            row.append(format_number(stage_parameters[stage]))
        row.append(f"{100 * stage_times[stage] / bottleneck:.1f}%" if bottleneck > 0 else "-")
        if plan.names is not None:
            row.append(compress_names(plan.names[layers.start : layers.stop]))
        rows.append(row)

    widths = [
        max(len(header), *(len(row[column]) for row in rows))
        for column, header in enumerate(headers)
    ]
    # Text columns (layer ranges, names) align left, numbers right; names are not padded.
    left = {"layers", "names"}

    def line(cells: Sequence[str]) -> str:
        laid_out = [
            cell.ljust(width) if header in left else cell.rjust(width)
            for header, cell, width in zip(headers, cells, widths, strict=True)
        ]
        return "  ".join(laid_out).rstrip()

    busiest = stage_times.index(bottleneck)
    footer = (
        f"bottleneck {format_number(bottleneck)} (stage {busiest}), "
        f"imbalance {plan.imbalance:.3f}, method {plan.method}"
    )
    return "\n".join([line(headers), *(line(row) for row in rows), footer])
