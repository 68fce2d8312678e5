"""Byte counts for people to read: ``1.20 GiB (1,288,490,188 bytes)``."""

from __future__ import annotations

__all__ = ["format_bytes", "show_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(count: int) -> str:
    """``773 KiB``, ``1.14 GiB``: three significant digits, binary units."""
    value, unit = float(count), 0
    while round(value, 1) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{count} B"
    decimals = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{decimals}f} {_UNITS[unit]}"


def show_bytes(count: float) -> str:
    """For messages: readable and exact, ``1.20 GiB (1,288,490,188 bytes)``."""
    exact = int(count)
    return f"{format_bytes(exact)} ({exact:,} bytes)" if exact >= 1024 else f"{exact} bytes"
