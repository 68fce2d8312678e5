"""Fixed-width text tables: columns of already formatted cells, headers, a footer.

It knows nothing of plans; :meth:`PartitionPlan.table` builds the columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

_TIMES = "\u00d7"  # the multiplication sign, as in "24\u00d7Block"
_ELLIPSIS = "..."


@dataclass(frozen=True)
class Column:
    """One column: a header and one cell per row; text aligns left, numbers right."""

    header: str
    cells: Sequence[str]
    left: bool = False


def render_table(columns: Sequence[Column], footer: Sequence[str] = ()) -> str:
    """The header line, one line per row, then the footer lines.

    Columns are two spaces apart and each as wide as its widest cell; trailing spaces are
    dropped, so a left-aligned last column (e.g. names) is not padded.
    """
    widths = [max(len(column.header), *map(len, column.cells)) for column in columns]

    def line(cells: Sequence[str]) -> str:
        laid_out = [
            cell.ljust(width) if column.left else cell.rjust(width)
            for column, cell, width in zip(columns, cells, widths, strict=True)
        ]
        return "  ".join(laid_out).rstrip()

    rows = zip(*(column.cells for column in columns), strict=True)
    return "\n".join(
        [line([column.header for column in columns]), *(line(row) for row in rows), *footer]
    )


def compress_names(names: Sequence[str]) -> str:
    """``Embedding, 24\u00d7Block, LayerNorm``: consecutive repeats counted, order kept."""
    parts = []
    for name, run in groupby(names):
        repeats = sum(1 for _ in run)
        parts.append(f"{repeats}{_TIMES}{name}" if repeats > 1 else name)
    return ", ".join(parts)


def shorten(text: str, width: int | None) -> str:
    """``text``, cut to ``width`` characters ending in ``...`` if it is longer."""
    if width is None or len(text) <= width:
        return text
    return text[: width - len(_ELLIPSIS)] + _ELLIPSIS


MIN_SHORTENED_WIDTH = len(_ELLIPSIS)
"""The narrowest width :func:`shorten` can cut to."""
