"""The result of partitioning: which stage owns which layers, and what each stage costs."""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from pipepartition._checks import (
    checked_boundaries,
    checked_index,
    checked_names,
    checked_strings,
    require_coverage,
    require_length,
)
from pipepartition._numbers import (
    count,
    counts,
    entries,
    format_number,
    non_negative_values,
    plural,
    positive_values,
)
from pipepartition._table import MIN_SHORTENED_WIDTH, Column, compress_names, render_table, shorten

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
        boundaries = checked_boundaries(self.boundaries)
        costs = tuple(non_negative_values(self.costs, name="costs"))
        num_layers, num_stages = len(costs), len(boundaries) - 1
        require_coverage(
            boundaries, num_layers, counted=f"costs has {entries(num_layers)} (one per layer)"
        )
        names = None
        if self.names is not None:
            names = checked_names(self.names)
            _require_per_layer("names", len(names), num_layers)
        parameters = None
        if self.parameters is not None:
            parameters = counts(self.parameters, name="parameters")
            _require_per_layer("parameters", len(parameters), num_layers)
        if not isinstance(self.method, str):
            raise TypeError(
                f"method must be a non-empty str, got {type(self.method).__name__}: {self.method!r}"
            )
        if not self.method:
            raise ValueError(
                "method must be a non-empty str, got ''; pass how the boundaries were chosen, "
                "e.g. 'parameters', or leave the default 'explicit'"
            )
        speeds = None
        if self.speeds is not None:
            speeds = tuple(positive_values(self.speeds, name="speeds", allow_inf=False))
            require_length("speeds", len(speeds), num_stages, per="stage")
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
        bounds = checked_boundaries(boundaries)
        # Passed on as given: the constructor checks and converts each field (a str where
        # names belong must reach checked_names, not become a tuple of characters).
        fields: dict[str, Any] = {
            "boundaries": bounds,
            "costs": (1,) * bounds[-1] if costs is None else costs,
            "names": names,
            "parameters": parameters,
            "method": method,
            "speeds": speeds,
        }
        return cls(**fields)

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
        index = checked_index(layer, name="layer", size=self.num_layers, what="global layer index")
        # The last stage starting at or before the layer; empty stages before it start at
        # the same position and are skipped by bisect_right.
        return bisect_right(self.boundaries, index) - 1

    def layers_of(self, stage: int) -> range:
        """Global layer indices owned by ``stage``."""
        index = checked_index(stage, name="stage", size=self.num_stages, what="stage index")
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

    def table(
        self,
        *,
        extra_columns: Mapping[str, Sequence[str]] | None = None,
        names: Sequence[str] | None = None,
        max_names_width: int | None = None,
    ) -> str:
        """A fixed-width text table: one row per stage and a footer line.

        Columns: stage, layer range, layer count, cost, (speed and time with speeds),
        (params when given), (``extra_columns``), load as a percentage of the bottleneck,
        (names, compressed like ``Embedding, 24\u00d7Block``, when there are names).

        Args:
            extra_columns: header -> one already formatted cell per stage, e.g.
                ``{"memory": ["1.2 GiB", ...]}``; shown right-aligned, in the mapping's
                order, just before ``load``.
            names: per-layer display names to show instead of :attr:`names`, one per layer
                (e.g. with a mark on tied layers); compressed the same way.
            max_names_width: cut a stage's names to this many characters, ending in
                ``...``; at least 3. None: never cut.

        Raises:
            TypeError: an argument, a header or a cell has the wrong type.
            ValueError: a header repeats a column, a column or ``names`` has the wrong
                length, or ``max_names_width`` is below 3.
        """
        shown_names = self.names
        if names is not None:
            shown_names = checked_names(names)
            _require_per_layer("names", len(shown_names), self.num_layers)
        width = None
        if max_names_width is not None:
            width = count(max_names_width, name="max_names_width", minimum=MIN_SHORTENED_WIDTH)
        columns = self._stage_columns(shown_names, width)
        load = next(index for index, column in enumerate(columns) if column.header == "load")
        columns[load:load] = self._checked_extra_columns(extra_columns, columns)

        busiest = self.stage_times.index(self.bottleneck)
        footer = (
            f"bottleneck {format_number(self.bottleneck)} (stage {busiest}), "
            f"imbalance {self.imbalance:.3f}, method {self.method}"
        )
        return render_table(columns, [footer])

    def _stage_columns(self, names: tuple[str, ...] | None, width: int | None) -> list[Column]:
        stages, times, bottleneck = self.stages, self.stage_times, self.bottleneck
        columns = [
            Column("stage", [str(stage) for stage in range(self.num_stages)]),
            Column(
                "layers",
                [f"{layers.start}..{layers.stop - 1}" if layers else "-" for layers in stages],
                left=True,
            ),
            Column("count", [str(len(layers)) for layers in stages]),
            Column("cost", [format_number(cost) for cost in self.stage_costs]),
        ]
        if self.speeds is not None:
            columns.append(Column("speed", [format_number(speed) for speed in self.speeds]))
            columns.append(Column("time", [format_number(time) for time in times]))
        stage_parameters = self.stage_parameters
        if stage_parameters is not None:
            columns.append(Column("params", [format_number(n) for n in stage_parameters]))
        columns.append(
            Column(
                "load",
                [f"{100 * time / bottleneck:.1f}%" if bottleneck > 0 else "-" for time in times],
            )
        )
        if names is not None:
            cells = [shorten(compress_names(names[s.start : s.stop]), width) for s in stages]
            columns.append(Column("names", cells, left=True))
        return columns

    def _checked_extra_columns(
        self, extra_columns: Mapping[str, Sequence[str]] | None, columns: Sequence[Column]
    ) -> list[Column]:
        if extra_columns is None:
            return []
        if not isinstance(extra_columns, Mapping):
            raise TypeError(
                "extra_columns must be a mapping of header -> one cell per stage, got "
                f"{type(extra_columns).__name__}"
            )
        taken = {column.header for column in columns}
        extra = []
        for header, cells in extra_columns.items():
            if not isinstance(header, str):
                raise TypeError(
                    f"extra_columns header {header!r} is of type {type(header).__name__}; "
                    "pass a str"
                )
            if not header or header in taken:
                raise ValueError(
                    f"extra_columns header {header!r} is empty or already a column of this "
                    f"table ({', '.join(sorted(taken))}); pick a new header"
                )
            where = f"extra_columns[{header!r}]"
            cells = checked_strings(cells, name=where, per="stage", hint="already formatted")
            require_length(
                where,
                len(cells),
                self.num_stages,
                per="stage",
                counted=f"the plan has {plural(self.num_stages, 'stage')}",
                unit="cell",
            )
            taken.add(header)
            extra.append(Column(header, cells))
        return extra

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


def _require_per_layer(name: str, actual: int, num_layers: int) -> None:
    require_length(
        name, actual, num_layers, per="layer", counted=f"the plan has {plural(num_layers, 'layer')}"
    )
