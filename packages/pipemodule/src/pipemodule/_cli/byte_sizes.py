"""``--memory-limit``'s byte sizes as people write them: ``80GiB``, ``512MiB``, ``1.5GB``."""

from __future__ import annotations

import re

__all__ = ["parse_bytes"]

_BINARY = ("KiB", "MiB", "GiB", "TiB", "PiB")
_FACTORS: dict[str, int] = {
    "": 1,
    "b": 1,
    **{unit.lower(): 1024 ** (power + 1) for power, unit in enumerate(_BINARY)},
    **{f"{prefix}b": 1000 ** (power + 1) for power, prefix in enumerate("kmgtp")},
}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_bytes(text: str) -> int:
    """``'80GiB'``, ``'512 MiB'``, ``'1.5GB'``, ``'1000000'`` as a whole number of bytes.

    Binary units (KiB, MiB, GiB, TiB, PiB) are powers of 1024, decimal ones (KB, MB, GB, TB,
    PB) powers of 1000, a bare number is bytes; case does not matter; fractions round down.

    Raises:
        ValueError: not a number with one of those units, or not more than 0 bytes.
    """
    match = _PATTERN.fullmatch(text)
    factor = None if match is None else _FACTORS.get(match.group(2).lower())
    if match is None or factor is None:
        raise ValueError(
            f"{text!r} is not a byte size; write a number and a unit, e.g. 80GiB, 512MiB, "
            "1.5GB or 1000000 (bytes)"
        )
    number: str = match.group(1)
    whole, _, fraction = number.partition(".")
    # Exact for any number of digits: no float rounding of e.g. 0.1GiB.
    numerator = int(whole or "0") * 10 ** len(fraction) + int(fraction or "0")
    count: int = numerator * factor // 10 ** len(fraction)
    if count < 1:
        raise ValueError(f"{text!r} is {count} bytes; a memory limit must be at least 1 byte")
    return count
