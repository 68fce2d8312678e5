"""Pipelines in real ``torchrun`` jobs, checked against one process computing the same thing.

``pipeline_scenarios.py`` runs every scenario in one launch per world size (launches are the
expensive part: seconds each); the tests here read what each rank wrote and compare it with a
single-process reference built from the same weights. gloo on CPU always; NCCL variants (marked
``cuda``) run where there are enough GPUs.

The 2-rank launch also loads the checkpoint that the 4-rank launch saved, so it waits for it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline_scenarios as sc
import pytest
import torch
import torch.distributed as dist
from torchrun_harness import LaunchCache, LaunchResult, shared_session_dir, torchrun

from pipemodule.examples import tied_unembed
from pipespec import LayerSpec, TiedLayerSpec

SCRIPT = Path(__file__).with_name("pipeline_scenarios.py")
LAUNCH_TIMEOUT_S = 120.0  # one launch takes ~10-30 s on 2 busy cores; two fit in pytest's 300 s

BACKENDS = [
    pytest.param("gloo", id="gloo"),
    pytest.param("nccl", id="nccl", marks=pytest.mark.cuda),
]
TIE = f"tied_modules.{sc.TIE_KEY}.weight"

Payload = sc.Payload
State = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------- launches


@dataclass(frozen=True)
class PipelineRun:
    """One launch of the scenario script: how it ended and what each rank wrote."""

    launch: LaunchResult
    statuses: list[dict[str, Any]]
    payloads: list[dict[str, Payload]]
    checkpoint: Path | None

    def scenario(self, name: str) -> list[Payload]:
        """Every rank's payload of scenario ``name``; fails the test if any rank lacks it."""
        # Every failing rank's traceback: the first to fail is often not the lowest rank (its
        # peers then fail in a send or recv with it).
        failed = [
            f"--- rank {rank} ---\n{str(status.get('traceback'))[-3000:]}"
            for rank, status in enumerate(self.statuses)
            if status.get("failed") == name
        ]
        if failed:
            pytest.fail(
                f"scenario {name!r} raised:\n" + "\n".join(failed) + "\n" + self.launch.report()
            )
        missing = [rank for rank, payload in enumerate(self.payloads) if name not in payload]
        if missing:
            pytest.fail(
                f"scenario {name!r} did not finish on ranks {missing}\n{self.launch.report()}"
            )
        return [payload[name] for payload in self.payloads]


class Launcher:
    """The scenario script's launches, one per (backend, world size), shared by all tests."""

    def __init__(self, cache: LaunchCache) -> None:
        self._cache = cache
        self._runs: dict[tuple[str, int], PipelineRun] = {}

    def run(self, backend: str, world: int) -> PipelineRun:
        _require(backend, world)
        if (backend, world) not in self._runs:
            self._runs[backend, world] = self._launch(backend, world)
        return self._runs[backend, world]

    def _launch(self, backend: str, world: int) -> PipelineRun:
        key = f"{backend}-{world}"
        folder = self._cache.folder(key)
        args = ["--out", str(folder / "ranks"), "--backend", backend]
        checkpoint: Path | None = None
        if world == 4:
            checkpoint = folder / "checkpoint"  # saved with 4 stages, reloaded with 2 x 2
            args += ["--save-to", str(checkpoint), "--load-from", str(checkpoint)]
        elif _enough_devices(backend, 4):
            four = self.run(backend, 4)
            if four.checkpoint is not None and all("save" in p for p in four.payloads):
                args += ["--load-from", str(four.checkpoint)]
        launch = self._cache.get(
            key, lambda _: torchrun(SCRIPT, world, args, timeout=LAUNCH_TIMEOUT_S)
        )
        statuses: list[dict[str, Any]] = []
        payloads: list[dict[str, Payload]] = []
        for rank in range(world):
            status_file = folder / "ranks" / f"rank_{rank}.json"
            tensors_file = folder / "ranks" / f"rank_{rank}.pt"
            statuses.append(json.loads(status_file.read_text()) if status_file.exists() else {})
            payloads.append(
                torch.load(tensors_file, weights_only=True) if tensors_file.exists() else {}
            )
        return PipelineRun(launch, statuses, payloads, checkpoint)


def _enough_devices(backend: str, world: int) -> bool:
    if backend == "gloo":
        return True
    return dist.is_nccl_available() and torch.cuda.device_count() >= world


def _require(backend: str, world: int) -> None:
    if not _enough_devices(backend, world):
        pytest.skip(f"{backend} with {world} ranks needs NCCL and {world} CUDA devices")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Launcher:
    return Launcher(LaunchCache(shared_session_dir(tmp_path_factory, "pipeline-launches")))


# ---------------------------------------------------------------------------------- reference


class _Unembed(torch.nn.Module):
    """The LM head of the reference: the embedding's own weight, shared, not copied."""

    def __init__(self, embedding: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tied_unembed(self.embedding, hidden)


def reference_model(state: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Sequential:
    """The whole model in one process, as an ``nn.Sequential``, with the pipeline's weights.

    Pipeline names: ``tied_modules.embed.weight`` and ``<layer index>.<name>``; in the
    sequential model the embedding is module 0, layer ``i`` is module ``i`` and the head is the
    last module, which holds the embedding itself (one tensor for both ends). Without
    ``state``, the weights are whatever the layers are built with.
    """
    layers = sc.model_layers()
    first = layers[0]
    assert isinstance(first, TiedLayerSpec)
    embedding = first.build()
    if state is not None:
        embedding.load_state_dict({"weight": state[TIE]})
    modules: list[torch.nn.Module] = [embedding]
    for index in range(1, len(layers) - 1):
        spec = layers[index]
        assert isinstance(spec, LayerSpec)
        module = spec.build()
        if state is not None:
            prefix = f"{index}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
        modules.append(module)
    modules.append(_Unembed(embedding))
    return torch.nn.Sequential(*modules)


def pipeline_names(model: torch.nn.Sequential) -> State:
    """The reference's weights under the pipeline's names (the shared head counted once)."""
    head = str(len(model) - 1)
    state: State = {}
    for name, value in model.state_dict().items():
        index, rest = name.split(".", 1)
        if index == head:
            continue
        state[f"tied_modules.{sc.TIE_KEY}.{rest}" if index == "0" else name] = value.detach()
    return state


# Every tensor of the model, by pipeline name: what the ranks' states must add up to.
EXPECTED_NAMES = sorted(pipeline_names(reference_model()))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, backend: str, msg: str = "") -> None:
    """gloo runs the reference's CPU kernels; GPU kernels may sum in another order."""
    if backend == "gloo":
        torch.testing.assert_close(actual, expected, msg=msg or None)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=msg or None)


# ---------------------------------------------------------------------------------- payloads


def _int(payload: Payload, key: str) -> int:
    value = payload[key]
    assert isinstance(value, int), f"{key}={value!r}"
    return value


def _tensor(payload: Payload, key: str) -> torch.Tensor:
    value = payload[key]
    assert isinstance(value, torch.Tensor), f"{key} is {type(value).__name__}, not a tensor"
    return value


def _state(payload: Payload, key: str) -> State:
    value = payload[key]
    assert isinstance(value, dict), f"{key} is {type(value).__name__}, not a state dict"
    state: State = {}
    for name, tensor in value.items():
        assert isinstance(tensor, torch.Tensor), name
        state[str(name)] = tensor
    return state


def _sub(payload: Payload, key: str) -> Payload:
    value = payload[key]
    assert isinstance(value, dict), f"{key}={value!r}"
    return {str(k): v for k, v in value.items()}


def _coord(payload: Payload) -> dict[str, int]:
    coord = _sub(payload, "coord")
    return {axis: _int(coord, axis) for axis in coord}


def merge_states(states: Iterable[State]) -> State:
    """One state from every rank's part; a name held by several ranks must be bitwise equal."""
    merged: State = {}
    for rank, state in enumerate(states):
        for name, value in state.items():
            if name in merged:
                assert torch.equal(merged[name], value), f"rank {rank} holds a different {name}"
            else:
                merged[name] = value
    return merged


def assert_states_equal(actual: State, expected: State, what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert different == [], f"{what}: {different} differ bitwise"


# ---------------------------------------------------------------------------------- tests

WORLDS = pytest.mark.parametrize("world", [2, 4])
ON_BACKENDS = pytest.mark.parametrize("backend", BACKENDS)


@ON_BACKENDS
@WORLDS
def test_launch_exits_cleanly(launcher: Launcher, backend: str, world: int) -> None:
    run = launcher.run(backend, world)
    assert run.launch.returncode == 0, run.launch.report()
    assert [status.get("failed") for status in run.statuses] == [None] * world, run.launch.report()


@ON_BACKENDS
@WORLDS
def test_stage_by_stage_forward_equals_one_process(
    launcher: Launcher, backend: str, world: int
) -> None:
    payloads = launcher.run(backend, world).scenario("forward")
    assert sorted(_int(p, "stage") for p in payloads) == list(range(world))
    parts = payloads[0]["parts"]
    assert isinstance(parts, list)
    assert len(parts) == world + 1
    assert all(start < stop for start, stop in itertools.pairwise(parts)), parts
    outputs = [
        (_int(p, "stage"), _tensor(p, "output")) for p in payloads if p["output"] is not None
    ]
    assert [stage for stage, _ in outputs] == [world - 1], "only the last stage has logits"
    state = merge_states(_state(p, "state") for p in payloads)
    assert sorted(state) == EXPECTED_NAMES
    with torch.no_grad():
        reference = reference_model(state)(sc.input_tokens())
    assert reference.shape == (sc.BATCH, sc.SEQUENCE, sc.VOCAB)
    assert_close(outputs[0][1], reference, backend)


@ON_BACKENDS
@WORLDS
def test_tied_copies_are_equal_after_init_and_after_a_step(
    launcher: Launcher, backend: str, world: int
) -> None:
    payloads = launcher.run(backend, world).scenario("train")
    holders = [
        (_int(p, "stage"), _state(p, "initial")[TIE], _state(p, "final")[TIE])
        for p in payloads
        if p["holds_tie"]
    ]
    assert [stage for stage, _, _ in holders] == [0, world - 1], "the tie's stages hold copies"
    (_, first_initial, first_final), (_, last_initial, last_final) = holders
    assert torch.equal(first_initial, last_initial), "copies differ after construction"
    assert not torch.equal(first_initial, first_final), "the step did not move the tied weight"
    assert torch.equal(first_final, last_final), "copies differ after an optimizer step"


@ON_BACKENDS
@WORLDS
def test_one_training_step_equals_one_process(launcher: Launcher, backend: str, world: int) -> None:
    payloads = launcher.run(backend, world).scenario("train")
    initial = merge_states(_state(p, "initial") for p in payloads)
    final = merge_states(_state(p, "final") for p in payloads)
    assert sorted(final) == EXPECTED_NAMES
    model = reference_model(initial)
    loss = sc.loss_of(model(sc.input_tokens()), sc.target_tokens())
    torch.autograd.backward(loss)
    torch.optim.SGD(model.parameters(), lr=sc.LEARNING_RATE).step()
    (pipeline_loss,) = [p["loss"] for p in payloads if p["loss"] is not None]
    assert isinstance(pipeline_loss, float)
    assert pipeline_loss == pytest.approx(loss.item(), rel=1e-5)
    expected = pipeline_names(model)
    for name in EXPECTED_NAMES:
        assert_close(final[name], expected[name], backend, name)


@ON_BACKENDS
@WORLDS
def test_initial_weights_do_not_depend_on_the_number_of_stages(
    launcher: Launcher, backend: str, world: int
) -> None:
    by_stages = _init_states(launcher.run(backend, world))
    assert sorted(by_stages) == ([1, 2] if world == 2 else [1, 2, 4])
    assert sorted(by_stages[1]) == EXPECTED_NAMES
    for stages, state in by_stages.items():
        assert_states_equal(state, by_stages[1], f"{stages} stages vs 1 stage")


@ON_BACKENDS
def test_initial_weights_do_not_depend_on_the_world_size(launcher: Launcher, backend: str) -> None:
    two = _init_states(launcher.run(backend, 2))
    four = _init_states(launcher.run(backend, 4))
    assert_states_equal(two[2], four[4], "2 stages on 2 ranks vs 4 stages on 4 ranks")
    assert_states_equal(two[1], four[1], "1 stage on 2 ranks vs 1 stage on 4 ranks")


def _init_states(run: PipelineRun) -> dict[int, State]:
    """The merged initial weights per stage count (every data-parallel replica included)."""
    payloads = run.scenario("init")
    return {
        int(stages): merge_states(_state(_sub(p, stages), "state") for p in payloads)
        for stages in payloads[0]
    }


@ON_BACKENDS
@pytest.mark.parametrize("world", [4, 2], ids=["in-the-4-rank-job", "in-a-2-rank-job"])
def test_a_checkpoint_of_four_stages_loads_with_two(
    launcher: Launcher, backend: str, world: int
) -> None:
    saved = merge_states(_state(p, "state") for p in launcher.run(backend, 4).scenario("save"))
    assert sorted(saved) == EXPECTED_NAMES
    payloads = launcher.run(backend, world).scenario("load")
    stages_and_replicas = sorted((_int(p, "stage"), _int(p, "data")) for p in payloads)
    assert stages_and_replicas == sorted((s, d) for s in (0, 1) for d in range(world // 2))
    for rank, payload in enumerate(payloads):
        before, after = _state(payload, "before"), _state(payload, "after")
        # Saved values were scrambled, so a tensor not loaded keeps a value unlike the file's.
        assert [n for n in before if torch.equal(before[n], saved[n])] == [], "not a real test"
        assert_states_equal(after, {n: saved[n] for n in after}, f"rank {rank} after loading")
    merged = merge_states(_state(p, "after") for p in payloads)
    assert sorted(merged) == EXPECTED_NAMES


# (pipe, data, model) of ranks 0..3: row-major over the axes (pipe, data, model).
EXPECTED_COORDS = {
    "pp2_mp2_dp1": [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)],
    "pp2_mp1_dp2": [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)],
}
TOPOLOGY_IDS = pytest.mark.parametrize("layout", sorted(sc.TOPOLOGIES))


def _topology_payloads(launcher: Launcher, backend: str, layout: str) -> list[Payload]:
    return [_sub(p, layout) for p in launcher.run(backend, 4).scenario("topology")]


@ON_BACKENDS
@TOPOLOGY_IDS
def test_pipe_data_model_coordinates_and_neighbours(
    launcher: Launcher, backend: str, layout: str
) -> None:
    payloads = _topology_payloads(launcher, backend, layout)
    coords = [_coord(p) for p in payloads]
    assert [(c["pipe"], c["data"], c["model"]) for c in coords] == EXPECTED_COORDS[layout]
    assert [_int(p, "stage") for p in payloads] == [c["pipe"] for c in coords]
    assert [_int(p, "data_parallel_id") for p in payloads] == [c["data"] for c in coords]
    # The other stage at the same (data, model) is two ranks away in both layouts.
    assert [(p["previous"], p["next"]) for p in payloads] == [
        (None, 2),
        (None, 3),
        (0, None),
        (1, None),
    ]


@ON_BACKENDS
@TOPOLOGY_IDS
def test_forward_along_every_pipe_line_equals_one_process(
    launcher: Launcher, backend: str, layout: str
) -> None:
    payloads = _topology_payloads(launcher, backend, layout)
    state = merge_states(_state(p, "state") for p in payloads)
    assert sorted(state) == EXPECTED_NAMES
    with torch.no_grad():
        reference = reference_model(state)(sc.input_tokens())
    outputs = {rank: p["output"] for rank, p in enumerate(payloads) if p["output"] is not None}
    assert sorted(outputs) == [2, 3], "one output per pipe line, from its last stage"
    for output in outputs.values():
        assert isinstance(output, torch.Tensor)
        assert_close(output, reference, backend)


@ON_BACKENDS
@TOPOLOGY_IDS
def test_ties_join_the_stages_of_one_data_model_coordinate(
    launcher: Launcher, backend: str, layout: str
) -> None:
    payloads = _topology_payloads(launcher, backend, layout)
    assert [p["tie_groups"] for p in payloads] == [[[0, 2]], [[1, 3]], [[0, 2]], [[1, 3]]]
    before = [_tensor(p, "tie_before") for p in payloads]
    after = [_tensor(p, "tie_after") for p in payloads]
    assert all(torch.equal(before[0], b) for b in before), "every copy starts identical"
    for first, last in ((0, 2), (1, 3)):
        assert torch.equal(after[first], after[last]), f"ranks {first} and {last} differ"
        # Each copy's gradient was set per rank; the step applies the sum over the line only.
        summed = sum(sc.tie_gradient(_coord(payloads[r])) for r in (first, last))
        torch.testing.assert_close(
            before[first] - after[first],
            torch.full_like(before[first], sc.LEARNING_RATE * summed),
        )
    assert not torch.equal(after[0], after[1]), "the two pipe lines must step independently"
