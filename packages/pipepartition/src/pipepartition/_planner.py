"""From a method and per-layer facts to a validated :class:`PartitionPlan`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from pipepartition._balanced import partition_balanced
from pipepartition._capacity import require_layout_fits
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
from pipepartition._numbers import (
    Real,
    count,
    entries,
    non_negative_values,
    plural,
    positive_values,
)
from pipepartition._plan import PartitionPlan, coverage_error
from pipepartition._uniform import partition_uniform

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
) -> PartitionPlan:
    """Split ``len(names)`` layers into ``num_stages`` contiguous stages by ``method``.

    Methods (strings are parsed by :func:`parse_method`):

    - ``'uniform'`` / ``Uniform()``: :func:`partition_uniform`; every layer costs 1.
    - ``'parameters'`` / ``Parameters()``: balance ``parameters`` (required).
    - ``'type:REGEX'`` / ``TypeRegex(...)``: balance the number of layers whose name matches.
    - ``'profile'`` / ``Profile()``: balance the measured costs in ``profile`` (required).
    - ``Weights(weights)``: balance the given per-layer weights.
    - ``Boundaries(boundaries)``: take the boundaries as given (checked); every layer costs 1.

    Balanced methods are min-max optimal and honour ``speeds``, ``capacities`` and ``sizes``
    exactly as :func:`partition_balanced` does. 'uniform' and ``Boundaries`` place layers
    without looking at speeds; speeds are still recorded in the plan (its table shows stage
    times) and capacities are still checked (``sizes`` default to the plan's costs). When
    there are at least as many layers as stages, no stage is empty.

    Every rank must call this with the same arguments: the result is deterministic, so equal
    inputs give equal plans on every rank.

    Raises:
        TypeError: a name is not a str, or a number is not a real number.
        ValueError: a bad method, a missing ``parameters`` / ``profile``, a per-layer or
            per-stage sequence of the wrong length, a pattern that matches no layer,
            boundaries that do not fit the layers, or capacities that cannot be met.
    """
    chosen = parse_method(method)
    stages = count(num_stages, name="num_stages", minimum=1)
    layer_names = _checked_names(names)
    num_layers = len(layer_names)
    layer_parameters = None
    if parameters is not None:
        layer_parameters = tuple(
            count(value, name=f"parameters[{index}]", minimum=0)
            for index, value in enumerate(parameters)
        )
        _require_per_layer("parameters", len(layer_parameters), num_layers)
    speed_list = (
        None
        if speeds is None
        else positive_values(speeds, name="speeds", length=stages, per="stage", allow_inf=False)
    )

    costs: Sequence[Real]
    if isinstance(chosen, Uniform | Boundaries):
        costs = (1,) * num_layers
        if isinstance(chosen, Uniform):
            boundaries = partition_uniform(num_layers, stages)
        else:
            boundaries = _checked_boundaries(chosen, stages, num_layers)
        if capacities is not None:
            _require_capacities(boundaries, costs, stages, capacities, sizes, chosen)
        elif sizes is not None:
            raise ValueError(
                "sizes only matter together with capacities; pass capacities=[...] with one "
                "limit per stage, or drop sizes"
            )
    else:
        costs = _balanced_costs(chosen, layer_names, layer_parameters, profile)
        boundaries = partition_balanced(
            costs, stages, speeds=speed_list, capacities=capacities, sizes=sizes
        )

    plan = PartitionPlan(
        boundaries=tuple(boundaries),
        costs=tuple(costs),
        names=layer_names,
        parameters=layer_parameters,
        method=str(chosen),
        speeds=None if speed_list is None else tuple(speed_list),
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
        _require_per_layer("profile", len(measured), len(names))
        return measured
    if len(method.weights) != len(names):
        raise ValueError(
            f"Weights has {len(method.weights)} weights but there are {len(names)} layers; "
            "pass one weight per layer"
        )
    return list(method.weights)


def _checked_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str | bytes) or not isinstance(names, Sequence):
        raise TypeError(
            f"names must be a sequence of str (one per layer), got {type(names).__name__}"
        )
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(
                f"names[{index}] is {name!r} of type {type(name).__name__}; pass one str per "
                "layer, e.g. its class name"
            )
    return tuple(names)


def _checked_boundaries(method: Boundaries, stages: int, num_layers: int) -> list[int]:
    bounds = list(method.boundaries)
    if len(bounds) != stages + 1:
        raise ValueError(
            f"boundaries {bounds} describe {len(bounds) - 1} stages but num_stages is "
            f"{stages}; pass {stages + 1} positions"
        )
    if bounds[-1] != num_layers:
        counted = f"there are {plural(num_layers, 'layer')}"
        raise ValueError(coverage_error(bounds, num_layers, counted))
    if num_layers >= stages:
        for stage in range(stages):
            if bounds[stage] == bounds[stage + 1]:
                raise ValueError(
                    f"boundaries {bounds} leave stage {stage} empty; with {num_layers} layers "
                    f"for {stages} stages every stage needs at least one layer"
                )
    return bounds


def _require_capacities(
    boundaries: Sequence[int],
    costs: Sequence[Real],
    stages: int,
    capacities: Sequence[float],
    sizes: Sequence[float] | None,
    method: PartitionMethod,
) -> None:
    limits = positive_values(
        capacities, name="capacities", length=stages, per="stage", allow_inf=True
    )
    layer_sizes = list(costs) if sizes is None else non_negative_values(sizes, name="sizes")
    _require_per_layer("sizes", len(layer_sizes), len(costs))
    require_layout_fits(
        boundaries,
        layer_sizes,
        limits,
        why=f"method '{method}' places layers without looking at capacities; use a balanced "
        "method such as 'parameters' or Weights(...) to have capacities respected",
    )


def _require_per_layer(name: str, actual: int, num_layers: int) -> None:
    if actual != num_layers:
        raise ValueError(
            f"{name} has {entries(actual)} but there are {plural(num_layers, 'layer')} (one "
            "per name); pass one value per layer"
        )
