"""Properties of ProcessTopology that must hold for every shape."""

from __future__ import annotations

import math
import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from pipetopo import ProcessTopology, default_topology

_NAMES = ("pipe", "data", "model", "expert", "seq", "row", "col")


@st.composite
def topologies(draw: st.DrawFn) -> ProcessTopology:
    axes = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4, unique=True))
    dims = draw(st.lists(st.integers(1, 6), min_size=len(axes), max_size=len(axes)))
    return ProcessTopology(axes, dims)


def _row_major_rank(dims: tuple[int, ...], coord: tuple[int, ...]) -> int:
    """The layout rule written out independently: rank = sum(c_i * prod(dims[i+1:]))."""
    return sum(c * math.prod(dims[i + 1 :]) for i, c in enumerate(coord))


@given(topologies(), st.data())
def test_rank_to_coord_to_rank_round_trips(topo: ProcessTopology, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, topo.world_size() - 1))
    coord = topo.get_coord(rank)
    assert coord.axes == topo.axes
    assert all(0 <= v < d for v, d in zip(coord.values, topo.dims, strict=True))
    assert _row_major_rank(topo.dims, coord.values) == rank
    assert topo.get_rank(**coord.as_dict()) == rank


@given(topologies())
def test_every_coordinate_has_a_distinct_rank(topo: ProcessTopology) -> None:
    coords = {topo.get_coord(r) for r in range(topo.world_size())}
    assert len(coords) == topo.world_size() == math.prod(topo.dims)


@given(topologies())
def test_comm_lists_partition_the_world_along_each_axis(topo: ProcessTopology) -> None:
    world = topo.world_size()
    for index, axis in enumerate(topo.axes):
        lists = topo.get_axis_comm_lists(axis)
        assert len(lists) == world // topo.get_dim(axis)
        assert sorted(r for ranks in lists for r in ranks) == list(range(world))
        for ranks in lists:
            coords = [topo.get_coord(r).values for r in ranks]
            # Members differ only along `axis`, and are ordered by their coordinate there.
            assert [c[index] for c in coords] == list(range(topo.get_dim(axis)))
            others = {c[:index] + c[index + 1 :] for c in coords}
            assert len(others) == 1
        # Row-major order of the other axes: the lists' first members ascend.
        assert [ranks[0] for ranks in lists] == sorted(ranks[0] for ranks in lists)


@given(topologies(), st.data())
def test_filter_match_agrees_with_brute_force(topo: ProcessTopology, data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.sampled_from(topo.axes), unique=True))
    criteria = {axis: data.draw(st.integers(0, topo.get_dim(axis) - 1)) for axis in chosen}
    expected = [
        r
        for r in range(topo.world_size())
        if all(getattr(topo.get_coord(r), a) == v for a, v in criteria.items())
    ]
    assert topo.filter_match(**criteria) == expected


@given(topologies())
def test_axis_lists_of_one_axis_partition_the_world(topo: ProcessTopology) -> None:
    for axis in topo.axes:
        lists = [topo.get_axis_list(axis, i) for i in range(topo.get_dim(axis))]
        assert sorted(r for ranks in lists for r in ranks) == list(range(topo.world_size()))


@given(topologies())
def test_topology_survives_pickle_and_equals_a_rebuilt_copy(topo: ProcessTopology) -> None:
    rebuilt = ProcessTopology(list(topo.axes), list(topo.dims))
    assert rebuilt == topo
    assert hash(rebuilt) == hash(topo)
    assert pickle.loads(pickle.dumps(topo)) == topo


def _naive_prime_factors(number: int) -> list[int]:
    factors = []
    while number > 1:
        factor = next(f for f in range(2, number + 1) if number % f == 0)
        factors.append(factor)
        number //= factor
    return factors


@settings(max_examples=300)
@given(st.integers(1, 20_000))
def test_default_topology_alternates_prime_factors(world_size: int) -> None:
    topo = default_topology(world_size)
    primes = _naive_prime_factors(world_size)
    assert topo.axes == ("pipe", "data")
    assert topo.dims == (math.prod(primes[0::2]), math.prod(primes[1::2]))
    assert topo.world_size() == world_size
