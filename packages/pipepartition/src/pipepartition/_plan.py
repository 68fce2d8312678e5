"""The result of partitioning: which stage owns which layers, and what each stage costs."""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from pipepartition._numbers import (
    count,
    entries,
    integer,
    non_negative_values,
    plural,
    positive_values,
)
from pipepartition._table import render_table

_FIELDS = ("boundaries", "costs", "names", "parameters", "method", "speeds")


@dataclass(frozen=True)
class PartitionPlan:
    """Contiguous layers per pipeline stage, validated on construction.

    Stage ``s`` owns layers ``boundaries[s]`` up to, not including, ``boundaries[s + 1]``,
    so every layer belongs to exactly one stage and stages keep the layers' order. A stage
    may be empty only where the caller allowed it (fewer layers than stages).

    Attributes:
        boundaries: ``num_stages + 1`` non-decreasing positions from 0 to ``num_layers``.
        costs: the per-layer cost that was balanced (1 per layer for 'uniform').
        names: per-layer names, for display, or None.
        parameters: per-layer parameter counts, for display, or None.
        method: how the boundaries were chosen, e.g. ``'parameters'`` or ``'type:Block'``.
        speeds: per-stage speed factors the costs were divided by, or None (all 1).

    Stage costs are prefix-sum differences of ``costs``: the same arithmetic that
    :func:`partition_balanced` optimises, so :attr:`bottleneck` is the value it minimised.

    Lists are accepted wherever a tuple is expected and stored as tuples.

    Raises:
        TypeError: a field has the wrong type (e.g. a non-int boundary, a non-str name).
        ValueError: the boundaries do not place every layer exactly once, in order, or a
            per-layer or per-stage field has the wrong length or an invalid value.
    """

    boundaries: tuple[int, ...]
    costs: tuple[float, ...]
    names: tuple[str, ...] | None = None
    parameters: tuple[int, ...] | None = None
    method: str = "explicit"
    speeds: tuple[float, ...] | None = None
    _prefix: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        boundaries = _boundaries(self.boundaries)
        costs = tuple(non_negative_values(self.costs, name="costs"))
        num_layers = len(costs)
        if boundaries[-1] != num_layers:
            counted = f"costs has {entries(num_layers)} (one per layer)"
            raise ValueError(coverage_error(boundaries, num_layers, counted))
        names = None
        if self.names is not None:
            names = tuple(self.names)
            for index, name in enumerate(names):
                if not isinstance(name, str):
                    raise TypeError(
                        f"names[{index}] is {name!r} of type {type(name).__name__}; "
                        "names must be strings"
                    )
            _require_length("names", len(names), num_layers, "layer")
        parameters = None
        if self.parameters is not None:
            parameters = tuple(
                count(value, name=f"parameters[{index}]", minimum=0)
                for index, value in enumerate(self.parameters)
            )
            _require_length("parameters", len(parameters), num_layers, "layer")
        if not isinstance(self.method, str) or not self.method:
            raise TypeError(f"method must be a non-empty str, got {self.method!r}")
        speeds = None
        if self.speeds is not None:
            speeds = tuple(
                positive_values(
                    self.speeds,
                    name="speeds",
                    length=len(boundaries) - 1,
                    per="stage",
                    allow_inf=False,
                )
            )
        object.__setattr__(self, "boundaries", boundaries)
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "parameters", parameters)
        object.__setattr__(self, "speeds", speeds)
        object.__setattr__(self, "_prefix", tuple(accumulate(costs, initial=0)))

    @classmethod
    def from_boundaries(
        cls,
        boundaries: Sequence[int],
        costs: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        parameters: Sequence[int] | None = None,
        method: str = "explicit",
        speeds: Sequence[float] | None = None,
    ) -> PartitionPlan:
        """A plan for boundaries chosen elsewhere; ``costs`` default to 1 per layer."""
        checked = _boundaries(boundaries)
        return cls(
            boundaries=checked,
            costs=tuple(costs) if costs is not None else (1,) * checked[-1],
            names=tuple(names) if names is not None else None,
            parameters=tuple(parameters) if parameters is not None else None,
            method=method,
            speeds=tuple(speeds) if speeds is not None else None,
        )

    # -- shape --------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) - 1

    @property
    def num_layers(self) -> int:
        return self.boundaries[-1]

    @property
    def stages(self) -> tuple[range, ...]:
        """``layers_of(s)`` for every stage, in order."""
        bounds = self.boundaries
        return tuple(range(bounds[s], bounds[s + 1]) for s in range(self.num_stages))

    def stage_of(self, layer: int) -> int:
        """The stage that owns global layer index ``layer`` (O(log num_stages))."""
        index = integer(layer, name="layer")
        if not 0 <= index < self.num_layers:
            raise ValueError(
                f"layer {layer} is outside this plan's layers 0..{self.num_layers - 1}; pass a "
                "global layer index in that range"
            )
        # The last stage starting at or before the layer; empty stages before it start at
        # the same position and are skipped by bisect_right.
        return bisect_right(self.boundaries, index) - 1

    def layers_of(self, stage: int) -> range:
        """Global layer indices owned by ``stage``."""
        index = integer(stage, name="stage")
        if not 0 <= index < self.num_stages:
            raise ValueError(
                f"stage {stage} is outside this plan's stages 0..{self.num_stages - 1}; pass a "
                "stage index in that range"
            )
        return range(self.boundaries[index], self.boundaries[index + 1])

    # -- costs --------------------------------------------------------------------------

    @property
    def stage_costs(self) -> tuple[float, ...]:
        """Sum of the layer costs of each stage."""
        prefix, bounds = self._prefix, self.boundaries
        return tuple(prefix[bounds[s + 1]] - prefix[bounds[s]] for s in range(self.num_stages))

    @property
    def stage_times(self) -> tuple[float, ...]:
        """Each stage's cost divided by its speed (its cost when there are no speeds)."""
        if self.speeds is None:
            return self.stage_costs
        return tuple(
            cost / speed for cost, speed in zip(self.stage_costs, self.speeds, strict=True)
        )

    @property
    def stage_parameters(self) -> tuple[int, ...] | None:
        """Sum of the layer parameter counts of each stage, when parameters were given."""
        if self.parameters is None:
            return None
        return tuple(sum(self.parameters[layers.start : layers.stop]) for layers in self.stages)

    @property
    def bottleneck(self) -> float:
        """The largest stage time: what limits the pipeline's throughput."""
        return max(self.stage_times)

    @property
    def imbalance(self) -> float:
        """Bottleneck over the ideal (total cost spread in proportion to speed); 1.0 is perfect.

        Without speeds that is the bottleneck over the mean stage cost. 1.0 when all costs are 0.
        """
        total = self._prefix[-1]
        if total == 0:
            return 1.0
        capacity = math.fsum(self.speeds) if self.speeds is not None else self.num_stages
        return float(self.bottleneck / (total / capacity))

    def table(self) -> str:
        """A fixed-width text table: one row per stage and a footer line.

        Columns: stage, layer range, layer count, cost, (speed and time with speeds),
        (params when given), load as a percentage of the bottleneck, (names, compressed
        like ``Embedding, 24\u00d7Block``, when given).
        """
        return render_table(self)

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: lists, numbers, strings and None."""
        return {
            "boundaries": list(self.boundaries),
            "costs": list(self.costs),
            "names": None if self.names is None else list(self.names),
            "parameters": None if self.parameters is None else list(self.parameters),
            "method": self.method,
            "speeds": None if self.speeds is None else list(self.speeds),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON; :meth:`from_json` restores an equal plan."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionPlan:
        """Inverse of :meth:`to_dict`; validates like the constructor."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a plan must be a mapping of fields, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown plan fields {unknown}; the fields are {list(_FIELDS)}")
        missing = [name for name in ("boundaries", "costs") if name not in data]
        if missing:
            raise ValueError(f"a plan needs the fields {missing}; got only {sorted(data)}")
        return cls.from_boundaries(
            data["boundaries"],
            costs=data["costs"],
            names=data.get("names"),
            parameters=data.get("parameters"),
            method=data.get("method", "explicit"),
            speeds=data.get("speeds"),
        )

    @classmethod
    def from_json(cls, text: str) -> PartitionPlan:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a JSON plan: {error}; pass the text from to_json()") from None
        return cls.from_dict(data)


def _boundaries(values: Sequence[int]) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"boundaries must be a sequence of ints, got {values!r}")
    bounds = tuple(
        integer(value, name=f"boundaries[{index}]") for index, value in enumerate(values)
    )
    if len(bounds) < 2:
        raise ValueError(
            f"boundaries {list(bounds)} describe no stage; pass num_stages + 1 positions, "
            "e.g. [0, 12, 24] for two stages of 12 layers"
        )
    if bounds[0] != 0:
        raise ValueError(
            f"boundaries {_show(bounds)} start at {bounds[0]}; the first must be 0 so that "
            "layer 0 belongs to stage 0"
        )
    for stage in range(len(bounds) - 1):
        if bounds[stage + 1] < bounds[stage]:
            raise ValueError(
                f"boundaries {_show(bounds)} decrease at stage {stage} ({bounds[stage]} then "
                f"{bounds[stage + 1]}); they must be non-decreasing so each layer is placed "
                "once, in order"
            )
    return bounds


def coverage_error(bounds: Sequence[int], num_layers: int, counted: str) -> str:
    """Why boundaries that do not end at ``num_layers`` are wrong, naming the stray layers;
    ``counted`` says where the layer count comes from, e.g. ``"there are 3 layers"``."""
    end = bounds[-1]
    if end < num_layers:
        problem = f"leaving layers [{end}, {num_layers}) without a stage"
    else:
        problem = f"placing layers [{num_layers}, {end}) that do not exist in the last stages"
    return (
        f"boundaries {_show(bounds)} end at {end} but {counted}, "
        f"{problem}; the last boundary must be {num_layers}"
    )


def _show(bounds: Sequence[int]) -> str:
    return str(list(bounds)) if len(bounds) <= 12 else f"[{bounds[0]}, ..., {bounds[-1]}]"


def _require_length(name: str, actual: int, expected: int, per: str) -> None:
    if actual != expected:
        raise ValueError(
            f"{name} has {entries(actual)} but the plan has {plural(expected, per)}; pass one "
            f"per {per}"
        )
