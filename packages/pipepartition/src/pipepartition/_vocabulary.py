"""The two vocabularies of error messages: items and parts, or layers and stages.

``partition_uniform`` and ``partition_balanced`` keep DeepSpeed's signatures, which split
*items* into *parts*, so their messages say item and part. ``plan_partition`` and
``PartitionPlan`` place *layers* on pipeline *stages*, so theirs say layer and stage. The
shared checking and explaining code takes the vocabulary of the entry point that called it,
so a message never names a thing the caller did not pass. An item is a layer and a part is
a stage; only the words differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipepartition._numbers import plural


@dataclass(frozen=True)
class Vocabulary:
    """The singular nouns for what is split (``item``) and what it is split into (``part``)."""

    item: str
    part: str

    def items(self, number: int) -> str:
        """``1 item``, ``3 items``."""
        return plural(number, self.item)


ITEMS = Vocabulary("item", "part")
"""What partition_uniform and partition_balanced speak (DeepSpeed's names)."""

LAYERS = Vocabulary("layer", "stage")
"""What plan_partition and PartitionPlan speak."""
