"""From a method and per-layer facts to a validated :class:`PartitionPlan`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from pipepartition._balanced import balanced_boundaries
from pipepartition._capacity import require_layout_fits
from pipepartition._checks import (
    Constraints,
    checked_constraints,
    checked_names,
    require_boundary_count,
    require_coverage,
    require_length,
    require_no_empty_stage,
)
from pipepartition._methods import (
    Boundaries,
    Parameters,
    PartitionMethod,
    Profile,
    TypeRegex,
    Uniform,
    Weights,
    parse_method,
)
from pipepartition._numbers import Real, count, counts, non_negative_values, plural
from pipepartition._plan import PartitionPlan
from pipepartition._uniform import partition_uniform
from pipepartition._vocabulary import LAYERS

logger = logging.getLogger(__name__)


def plan_partition(
    method: str | PartitionMethod,
    num_stages: int,
    *,
    names: Sequence[str],
    parameters: Sequence[int] | None = None,
    profile: Sequence[float] | None = None,
    speeds: Sequence[float] | None = None,
    capacities: Sequence[float] | None = None,
    sizes: Sequence[float] | None = None,
    part_sizes: Sequence[Sequence[float]] | None = None,
) -> PartitionPlan:
    """Split ``len(names)`` layers into ``num_stages`` contiguous stages by ``method``.

    Methods (strings are parsed by :func:`parse_method`):

    - ``'uniform'`` / ``Uniform()``: :func:`partition_uniform`; every layer costs 1.
    - ``'parameters'`` / ``Parameters()``: balance ``parameters`` (required).
    - ``'type:REGEX'`` / ``TypeRegex(...)``: balance the number of layers whose name matches.
    - ``'profile'`` / ``Profile()``: balance the measured costs in ``profile`` (required).
    - ``Weights(weights)``: balance the given per-layer weights.
    - ``Boundaries(boundaries)``: take the boundaries as given (checked); every layer costs 1.

    Balanced methods are min-max optimal and honour ``speeds``, ``capacities``, ``sizes``
    and ``part_sizes`` (one list of layer sizes per stage, for sizes that depend on the
    stage) exactly as :func:`partition_balanced` does. 'uniform' and ``Boundaries`` place layers
    without looking at speeds; speeds are still recorded in the plan (its table shows stage
    times) and capacities are still checked (``sizes`` default to the plan's costs). When
    there are at least as many layers as stages, no stage is empty.

    Every rank must call this with the same arguments: the result is deterministic, so equal
    inputs give equal plans on every rank.

    Raises:
        TypeError: a name is not a str, or a number is not a real number.
        ValueError: a bad method, a missing ``parameters`` / ``profile``, a per-layer or
            per-stage sequence of the wrong length, a pattern that matches no layer,
            boundaries that do not fit the layers, or capacities that cannot be met (a
            :class:`CapacityError`, with the closest split and the shortfall as values).
    """
    chosen = parse_method(method)
    stages = count(num_stages, name="num_stages", minimum=1)
    layer_names = checked_names(names)
    num_layers = len(layer_names)
    counted = f"there are {plural(num_layers, 'layer')} (one per name)"
    layer_parameters = None
    if parameters is not None:
        layer_parameters = counts(parameters, name="parameters")
        require_length(
            "parameters", len(layer_parameters), num_layers, per="layer", counted=counted
        )
    constraints = checked_constraints(
        speeds,
        capacities,
        sizes,
        num_parts=stages,
        num_items=num_layers,
        words=LAYERS,
        items_counted=counted,
        part_sizes=part_sizes,
    )

    costs: list[Real]
    if isinstance(chosen, Uniform | Boundaries):
        costs = [1] * num_layers
        if isinstance(chosen, Uniform):
            boundaries: Sequence[int] = partition_uniform(num_layers, stages)
        else:
            boundaries = _fitted_boundaries(chosen, stages, num_layers)
        _require_capacities(boundaries, costs, constraints, chosen)
    else:
        costs = _balanced_costs(chosen, layer_names, layer_parameters, profile, counted)
        boundaries = balanced_boundaries(costs, stages, constraints, LAYERS)

    plan = PartitionPlan(
        boundaries=tuple(boundaries),
        costs=tuple(costs),
        names=layer_names,
        parameters=layer_parameters,
        method=str(chosen),
        speeds=None if constraints.speeds is None else tuple(constraints.speeds),
    )
    logger.debug(
        "method %s: %d layers into %d stages, boundaries %s, bottleneck %r",
        plan.method,
        num_layers,
        stages,
        list(plan.boundaries),
        plan.bottleneck,
    )
    return plan


def _balanced_costs(
    method: Parameters | TypeRegex | Profile | Weights,
    names: tuple[str, ...],
    parameters: tuple[int, ...] | None,
    profile: Sequence[float] | None,
    counted: str,
) -> list[Real]:
    if isinstance(method, Parameters):
        if parameters is None:
            raise ValueError(
                "method 'parameters' needs per-layer parameter counts: pass parameters=[...] "
                f"with one int per layer ({len(names)} layers), or use 'uniform'"
            )
        return list(parameters)
    if isinstance(method, TypeRegex):
        weights: list[Real] = [1 if method.matches(name) else 0 for name in names]
        if names and not any(weights):
            common = [name for name, _ in Counter(names).most_common()]
            distinct = list(dict.fromkeys(names))
            shown = ", ".join(repr(name) for name in distinct[:20])
            more = f", ... ({len(distinct)} in all)" if len(distinct) > 20 else ""
            raise ValueError(
                f"'{method}' matches none of the {len(names)} layer names; the distinct names "
                f"are {shown}{more}; use a pattern that matches the layers to balance, e.g. "
                f"'type:{common[0]}'"
            )
        return weights
    if isinstance(method, Profile):
        if profile is None:
            raise ValueError(
                "method 'profile' needs measured per-layer costs: pass profile=[...] with one "
                f"cost per layer ({len(names)} layers, e.g. seconds of forward + backward), or "
                "use 'parameters'"
            )
        measured = non_negative_values(profile, name="profile")
        require_length("profile", len(measured), len(names), per="layer", counted=counted)
        return measured
    require_length(
        "Weights",
        len(method.weights),
        len(names),
        per="layer",
        counted=f"there are {plural(len(names), 'layer')}",
        unit="weight",
        has=plural(len(method.weights), "weight"),
    )
    return list(method.weights)


def _fitted_boundaries(method: Boundaries, stages: int, num_layers: int) -> tuple[int, ...]:
    """A Boundaries method's boundaries, checked against the stages and layers at hand."""
    bounds = tuple(method.boundaries)  # their shape was checked when the method was made
    require_boundary_count(bounds, stages)
    require_coverage(bounds, num_layers, counted=f"there are {plural(num_layers, 'layer')}")
    require_no_empty_stage(bounds)
    return bounds


def _require_capacities(
    boundaries: Sequence[int],
    costs: Sequence[Real],
    constraints: Constraints,
    method: PartitionMethod,
) -> None:
    """Check a layout chosen without looking at capacities against them."""
    if constraints.capacities is None:
        return
    require_layout_fits(
        boundaries,
        constraints.sizes_by_part(list(costs), len(boundaries) - 1),
        constraints.capacities,
        words=LAYERS,
        why=f"method '{method}' places layers without looking at capacities; use a balanced "
        "method such as 'parameters' or Weights(...) to have capacities respected",
    )
