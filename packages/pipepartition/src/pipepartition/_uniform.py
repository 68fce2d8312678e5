"""Splitting by layer count alone."""

from __future__ import annotations

from pipepartition._numbers import count


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Boundaries that give every part the same number of items, give or take one.

    The first ``num_items % num_parts`` parts get the extra item, as DeepSpeed does. Part
    ``s`` holds items ``boundaries[s]`` up to, not including, ``boundaries[s + 1]``. With
    fewer items than parts, the first ``num_items`` parts hold one item each and the rest
    are empty.

    >>> partition_uniform(10, 4)
    [0, 3, 6, 8, 10]
    >>> partition_uniform(2, 4)
    [0, 1, 2, 2, 2]
    """
    num_items = count(num_items, name="num_items", minimum=0)
    num_parts = count(num_parts, name="num_parts", minimum=1)
    base, extra = divmod(num_items, num_parts)
    return [part * base + min(part, extra) for part in range(num_parts + 1)]
