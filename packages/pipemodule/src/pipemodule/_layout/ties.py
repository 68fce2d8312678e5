"""Tied layers: which layers share a key, and which stages and ranks hold a copy of its module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from pipemodule._layout.placement import StagePlacement
from pipepartition import PartitionPlan
from pipespec import Layer, TiedLayerSpec, resolve_tied_attr
from pipetopo import ProcessTopology

__all__ = ["TieGroup", "check_tied_attrs", "find_ties", "tie_groups"]


@dataclass(frozen=True)
class TieGroup:
    """One tie key: the layers that use it, the stages that hold a copy, and its owner.

    Every stage that runs a layer of the key builds the key's module once; the copies are kept
    identical by broadcasting the owner's values at construction and by summing gradients over
    the copies after each backward.

    Attributes:
        key: the tie key.
        spec: the first occurrence; every occurrence builds the same module (checked).
        layer_indices: global indices of the layers that use the key, ascending.
        stages: the stages that use the key, ascending.
        rank_sets: for every pipeline replica (each line of the topology's ``pipe`` axis, in
            row-major order), the topology ranks holding a copy; the groups over which copies
            talk. Empty when one rank holds every stage of the key: the stages of a rank share
            one module object, so that rank's copy needs no communication.
    """

    key: str
    spec: TiedLayerSpec
    layer_indices: tuple[int, ...]
    stages: tuple[int, ...]
    rank_sets: tuple[tuple[int, ...], ...]

    @property
    def first_layer(self) -> int:
        """The layer under whose index the tied module's checkpoint file is written."""
        return self.layer_indices[0]

    @property
    def owner_stage(self) -> int:
        """The stage whose rank's values the other copies take: the first stage using the key."""
        return self.stages[0]

    @property
    def attrs(self) -> tuple[str, ...]:
        """The attribute paths of the tied tensors (``tied_weight_attr``)."""
        return self.spec.tied_weight_attr


def find_ties(layers: Sequence[Layer]) -> dict[str, tuple[int, ...]]:
    """The layer indices of every tie key, keys in sorted order.

    Every occurrence of a key shares one module per stage, so all of them must describe the same
    module: a different class, arguments or ``tied_weight_attr`` is an error (DeepSpeed silently
    builds the first and ignores the rest). ``forward_fn`` may differ: that is how an embedding
    is reused as the output projection.
    """
    occurrences: dict[str, list[tuple[int, TiedLayerSpec]]] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, TiedLayerSpec):
            occurrences.setdefault(layer.key, []).append((index, layer))
    ties: dict[str, tuple[int, ...]] = {}
    for key in sorted(occurrences):
        (first_index, first), *others = occurrences[key]
        for index, other in others:
            if not (
                first.builds_same_module(other) and first.tied_weight_attr == other.tied_weight_attr
            ):
                raise ValueError(
                    f"tie key {key!r} is used by layers {first_index} and {index} with different "
                    f"modules: {first!r} vs {other!r}; every occurrence of a key shares one "
                    f"module, so give them the same class, arguments and tied_weight_attr (use "
                    f"forward_fn to use the module differently), or use different keys"
                )
        ties[key] = (first_index, *(index for index, _ in others))
        check_tied_attrs(key, first_index, first)
    return ties


def check_tied_attrs(key: str, index: int, spec: TiedLayerSpec) -> None:
    """Refuse a ``tied_weight_attr`` that names no tensor of the module, checked on meta.

    The copies are linked only after the grid's collectives, and not at all with one stage, so
    without this check a typo surfaces late, on the holding ranks only, or never. Building on
    meta allocates nothing; a class that cannot be built there is left to the real build.
    """
    try:
        module = spec.build(device="meta")
    except Exception:  # not meta-constructible: the real build reports its own errors
        return
    for attr in spec.tied_weight_attr:
        try:
            resolve_tied_attr(module, attr)
        except (AttributeError, TypeError) as error:
            tensors = [name for name, _ in module.named_parameters()]
            tensors += [name for name, _ in module.named_buffers()]
            raise ValueError(
                f"tied_weight_attr={attr!r} of tie key {key!r} (layer {index}, {spec!r}) names "
                f"no tensor of the module: {error}. Its tensors are {tensors[:8]}"
                f"{' ...' if len(tensors) > 8 else ''}; pass one of those"
            ) from None


def tie_groups(
    layers: Sequence[Layer],
    plan: PartitionPlan,
    topology: ProcessTopology,
    placement: StagePlacement,
    found: Mapping[str, tuple[int, ...]],
) -> Mapping[str, TieGroup]:
    """Every tie key of ``layers`` (``found`` by :func:`find_ties`) with its holders under ``plan``.

    Keys in sorted order.
    """
    pipe_lines = topology.get_axis_comm_lists("pipe")
    groups: dict[str, TieGroup] = {}
    for key, indices in found.items():
        spec = layers[indices[0]]
        if not isinstance(spec, TiedLayerSpec):  # find_ties only indexes TiedLayerSpecs
            raise TypeError(f"layer {indices[0]} of tie key {key!r} is not a TiedLayerSpec")
        stages = tuple(sorted({plan.stage_of(index) for index in indices}))
        pipe_ranks = sorted({placement.pipe_rank_of(stage) for stage in stages})
        rank_sets = (
            tuple(tuple(line[pipe_rank] for pipe_rank in pipe_ranks) for line in pipe_lines)
            if len(pipe_ranks) > 1
            else ()
        )
        groups[key] = TieGroup(key, spec, indices, stages, rank_sets)
    return MappingProxyType(groups)
