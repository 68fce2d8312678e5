"""The catalogue of user mistakes and faults for pipemodule, one test each.

Each case asserts the error's type and what its message names (value, reason, fix); multi-rank
cases run real gloo ranks with a short timeout, assert that every rank raised, and that it did
so promptly rather than after a process-group timeout. See the README's "What goes wrong, and
what you see".
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pipemodule import LayerSpec, PipelineModule, TiedLayerSpec, plan_pipeline
from pipemodule._layout.fingerprint import layer_signature
from pipemodule.examples import FeedForwardBlock, gpt_layers
from pipetopo.testing import RankFailedError, spawn_ranks, world_of_one

# Long enough for process start-up on a loaded 2-core machine; every error below must come far
# sooner than this (the process groups of spawn_ranks get the same timeout).
TIMEOUT = 120.0
PROMPT_S = 30.0


def _layers(count: int = 4) -> list[Any]:
    return [LayerSpec(torch.nn.Linear, 4, 4) for _ in range(count)]


class Scaled(torch.nn.Module):
    """A layer with a tensor constructor argument, as a learned-scale init would take."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4) * scale)


class Exploding(torch.nn.Module):
    def __init__(self, boom: bool) -> None:
        super().__init__()
        if boom:
            raise RuntimeError("out of memory while building (simulated)")
        self.linear = torch.nn.Linear(4, 4)


def _outcome(build: Any) -> tuple[str, str, float]:
    """Run ``build()`` on this rank: ("ok" or the error's class name, its message, seconds)."""
    start = time.monotonic()
    try:
        build()
    except Exception as error:
        return type(error).__name__, str(error), time.monotonic() - start
    return "ok", "", time.monotonic() - start


def _prompt(outcomes: list[tuple[str, str, float]]) -> None:
    for kind, message, seconds in outcomes:
        assert seconds < PROMPT_S, f"{kind} after {seconds:.1f} s: {message}"


# ------------------------------------------------------------------ local, one rank


def test_num_stages_of_wrong_type() -> None:
    with world_of_one(), pytest.raises(TypeError, match=r"num_stages='1' is a str"):
        PipelineModule(_layers(), num_stages="1", device="cpu")  # type: ignore[arg-type]


def test_num_stages_zero() -> None:
    with world_of_one(), pytest.raises(ValueError, match=r"num_stages=0 is too small"):
        PipelineModule(_layers(), num_stages=0, device="cpu")


def test_one_layer_cannot_fill_two_stages() -> None:
    with pytest.raises(ValueError, match=r"1 layer cannot fill 2 pipeline stages.*use 1 stage"):
        plan_pipeline(_layers(1), num_stages=2)


def test_seed_layers_of_wrong_type() -> None:
    with world_of_one(), pytest.raises(TypeError, match=r"seed_layers='yes' is a str"):
        PipelineModule(_layers(), num_stages=1, seed_layers="yes", device="cpu")  # type: ignore[arg-type]


def test_negative_base_seed() -> None:
    with world_of_one(), pytest.raises(ValueError, match=r"base_seed=-1 is too small"):
        PipelineModule(_layers(), num_stages=1, base_seed=-1, device="cpu")


def test_invalid_partition_regex() -> None:
    with world_of_one(), pytest.raises(ValueError, match=r"not a valid regular expression"):
        PipelineModule(_layers(), num_stages=1, partition_method="type:(", device="cpu")


def test_memory_limit_no_partition_meets() -> None:
    with world_of_one(), pytest.raises(ValueError, match=r"capacity"):
        PipelineModule(_layers(), num_stages=1, stage_memory_limits=[10], device="cpu")


def test_profile_without_a_sample_input() -> None:
    with world_of_one(), pytest.raises(ValueError, match=r"pass profile_input="):
        PipelineModule(_layers(), num_stages=1, partition_method="profile", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda() -> None:
    with world_of_one(), pytest.raises(ValueError, match=r"device='cuda' asks for CUDA"):
        PipelineModule(_layers(), num_stages=1, device="cuda")


def test_process_group_of_wrong_type() -> None:
    with world_of_one(), pytest.raises(TypeError, match=r"process_group='world' is a str"):
        PipelineModule(_layers(), num_stages=1, process_group="world", device="cpu")  # type: ignore[arg-type]


def test_process_group_non_member_marker() -> None:
    marker: Any = dist.GroupMember.NON_GROUP_MEMBER
    with world_of_one(), pytest.raises(ValueError, match=r"is not a member of process_group"):
        PipelineModule(_layers(), num_stages=1, process_group=marker, device="cpu")


def test_misspelt_tied_weight_attr_with_one_stage() -> None:
    layers = [TiedLayerSpec("embed", torch.nn.Embedding, 8, 4, tied_weight_attr="wieght")]
    with world_of_one(), pytest.raises(ValueError, match=r"'wieght'.*names no tensor.*'weight'"):
        PipelineModule(layers, num_stages=1, device="cpu")


def test_tied_weight_attr_checked_without_a_process_group() -> None:
    layers = [*gpt_layers(16, 4, 1)]
    layers[0] = TiedLayerSpec("embed", torch.nn.Embedding, 16, 4, tied_weight_attr="bias")
    layers[-1] = TiedLayerSpec("embed", torch.nn.Embedding, 16, 4, tied_weight_attr="bias")
    with pytest.raises(ValueError, match=r"tied_weight_attr='bias'"):
        plan_pipeline(layers, num_stages=2)


def test_layer_constructor_that_raises_names_the_stage() -> None:
    with world_of_one(), pytest.raises(RuntimeError, match=r"simulated"):
        PipelineModule([LayerSpec(Exploding, True)], num_stages=1, device="cpu")


def test_tensor_arguments_that_print_alike_have_different_fingerprints() -> None:
    low, high = torch.tensor([0.10001]), torch.tensor([0.10002])
    assert repr(low) == repr(high)
    assert layer_signature(LayerSpec(Scaled, low)) != layer_signature(LayerSpec(Scaled, high))
    assert layer_signature(LayerSpec(Scaled, low)) == layer_signature(LayerSpec(Scaled, low + 0))


def test_closed_module_keeps_layers_but_refuses_to_communicate() -> None:
    with world_of_one():
        with PipelineModule(gpt_layers(16, 4, 1), num_stages=1, device="cpu") as model:
            pass
        model.close()  # twice is fine
        assert model(torch.zeros(1, 2, dtype=torch.long)).shape == (1, 2, 16)
        with pytest.raises(RuntimeError, match=r"grid was closed"):
            model.grid.axis_group("data")


# ------------------------------------------------------------------ ranks that disagree


def _num_stages_differ() -> tuple[str, str, float]:
    stages = 4 if dist.get_rank() == 3 else 2
    return _outcome(lambda: PipelineModule(_layers(), num_stages=stages, device="cpu"))


def test_num_stages_that_differ_between_ranks_raise_everywhere() -> None:
    outcomes = spawn_ranks(_num_stages_differ, 4, timeout=TIMEOUT)
    assert {kind for kind, _, _ in outcomes} == {"PipelineRankError"}, outcomes
    assert all("topologies differ" in message for _, message, _ in outcomes)
    _prompt(outcomes)


def _seeding_differs(what: str) -> tuple[str, str, float]:
    other = dist.get_rank() == 1
    choices: dict[str, dict[str, Any]] = {
        "seed_layers": {"seed_layers": other},
        "base_seed": {"seed_layers": True, "base_seed": 7 if other else 1234},
    }
    options = choices[what]
    return _outcome(lambda: PipelineModule(_layers(), num_stages=1, device="cpu", **options))


@pytest.mark.parametrize("what", ["seed_layers", "base_seed"])
def test_seeding_that_differs_between_replicas_raises(what: str) -> None:
    outcomes = spawn_ranks(_seeding_differs, 2, what, timeout=TIMEOUT)
    assert {kind for kind, _, _ in outcomes} == {"PipelineRankError"}, outcomes
    assert all("the seeding differs" in message for _, message, _ in outcomes)
    _prompt(outcomes)


def _tensor_argument_differs() -> tuple[str, str, float]:
    scale = torch.tensor([0.10001 if dist.get_rank() == 0 else 0.10002])
    layers = [LayerSpec(Scaled, scale)]
    return _outcome(
        lambda: PipelineModule(layers, num_stages=1, partition_method="uniform", device="cpu")
    )


def test_tensor_arguments_that_print_alike_but_differ_raise() -> None:
    outcomes = spawn_ranks(_tensor_argument_differs, 2, timeout=TIMEOUT)
    assert {kind for kind, _, _ in outcomes} == {"PipelineRankError"}, outcomes
    assert all("layer 0 differs" in message for _, message, _ in outcomes)


# ------------------------------------------------------------------ a mistake on one rank


def _mistake_on_rank_one(what: str) -> tuple[str, str, float]:
    mine = dist.get_rank() == 1
    choices: dict[str, dict[str, Any]] = {
        "regex": {"partition_method": "type:(" if mine else "type:Linear"},
        "memory": {"stage_memory_limits": [10, 10] if mine else None},
        "constructor": {},
    }
    arguments = choices[what]
    layers = [*_layers(3), LayerSpec(Exploding, mine and what == "constructor")]
    return _outcome(lambda: PipelineModule(layers, num_stages=2, device="cpu", **arguments))


@pytest.mark.parametrize(
    ("what", "own_error", "named"),
    [
        ("regex", "ValueError", "not a valid regular expression"),
        ("memory", "CapacityError", "capacity"),  # a ValueError
        ("constructor", "RuntimeError", "simulated"),
    ],
)
def test_a_mistake_on_one_rank_raises_on_every_rank_naming_it(
    what: str, own_error: str, named: str
) -> None:
    outcomes = spawn_ranks(_mistake_on_rank_one, 2, what, timeout=TIMEOUT)
    (kind0, message0, _), (kind1, message1, _) = outcomes
    assert kind1 == own_error, outcomes[1]
    assert named in message1, outcomes[1]
    assert kind0 == "PipelineRankError", outcomes[0]
    assert "rank 1:" in message0, message0
    assert named in message0, message0
    _prompt(outcomes)


def _profile_input_rejected() -> tuple[str, str, float]:
    return _outcome(
        lambda: PipelineModule(
            _layers(),
            num_stages=2,
            partition_method="profile",
            profile_input=torch.zeros(2, 3),  # the first Linear takes 4 features
            device="cpu",
        )
    )


def test_profile_input_the_first_layer_rejects() -> None:
    outcomes = spawn_ranks(_profile_input_rejected, 2, timeout=TIMEOUT)
    assert outcomes[0][0] == "RuntimeError"
    assert "shapes cannot be multiplied" in outcomes[0][1]
    assert outcomes[1][0] == "PipelineRankError"
    assert "profiling the layers" in outcomes[1][1]
    _prompt(outcomes)


def _bad_tied_attr_on_two_stages() -> tuple[str, str, float]:
    layers = gpt_layers(16, 4, 1)
    layers[0] = TiedLayerSpec("embed", torch.nn.Embedding, 16, 4, tied_weight_attr="wieght")
    layers[-1] = TiedLayerSpec("embed", torch.nn.Embedding, 16, 4, tied_weight_attr="wieght")
    return _outcome(lambda: PipelineModule(layers, num_stages=2, device="cpu"))


def test_misspelt_tied_weight_attr_raises_on_every_rank_before_the_grid() -> None:
    outcomes = spawn_ranks(_bad_tied_attr_on_two_stages, 2, timeout=TIMEOUT)
    assert all(kind == "ValueError" and "'wieght'" in msg for kind, msg, _ in outcomes), outcomes
    _prompt(outcomes)


def _excluded_rank() -> tuple[str, str, float]:
    alone = dist.new_group([0])  # every rank creates it; only rank 0 is a member
    group: Any = alone
    return _outcome(lambda: PipelineModule(_layers(), num_stages=1, process_group=group))


def test_process_group_that_excludes_the_rank() -> None:
    outcomes = spawn_ranks(_excluded_rank, 2, timeout=TIMEOUT)
    assert outcomes[0][0] == "ok", outcomes[0]
    assert outcomes[1][0] == "ValueError"
    assert "not a member of process_group" in outcomes[1][1]


# ------------------------------------------------------------------ collective methods


def _save_on_rank_zero_only(directory: str) -> tuple[str, str, float]:
    os.environ["PIPEMODULE_ENTRY_TIMEOUT_S"] = "3"
    model = PipelineModule(_layers(), num_stages=2, device="cpu")
    if dist.get_rank() != 0:
        time.sleep(8)  # busy elsewhere, as a rank skipping the save would be
        return "skipped", "", 0.0
    return _outcome(lambda: model.save_state_dict(directory))


def test_save_state_dict_on_one_rank_only_is_detected(tmp_path: Any) -> None:
    outcomes = spawn_ranks(_save_on_rank_zero_only, 2, str(tmp_path), timeout=TIMEOUT)
    kind, message, seconds = outcomes[0]
    assert kind == "PipelineRankError", outcomes[0]
    assert "not under `if rank == 0:`" in message
    assert "PIPEMODULE_ENTRY_TIMEOUT_S" in message
    assert 2.5 < seconds < 8, seconds


# ------------------------------------------------------------------ lost ranks


def _killed_before_agreement(report: str) -> None:
    if dist.get_rank() == 1:
        time.sleep(1)
        os._exit(3)  # killed, as the OOM killer would
    outcome = _outcome(lambda: PipelineModule(_layers(), num_stages=2, device="cpu"))
    with open(report, "w") as file:
        file.write(repr(outcome))


def test_a_killed_rank_is_reported_by_the_survivor(tmp_path: Any) -> None:
    report = tmp_path / "survivor.txt"
    with pytest.raises(RankFailedError) as raised:
        spawn_ranks(_killed_before_agreement, 2, str(report), timeout=TIMEOUT)
    assert list(raised.value.failures) == [1]
    assert "exited with code 3" in raised.value.failures[1]
    kind, message, seconds = eval(report.read_text())
    assert kind == "PipelineRankError"
    assert "lost contact with a peer" in message
    assert "global ranks [0, 1]" in message
    assert seconds < PROMPT_S


# ------------------------------------------------------------------ leaks and long runs


def _resources() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _repeated_constructions(count: int, close: bool) -> dict[str, Any]:
    first = PipelineModule(gpt_layers(16, 4, 2), num_stages=2, device="cpu")
    before = _resources()
    calls = []
    for _ in range(count):
        model = PipelineModule(gpt_layers(16, 4, 2), num_stages=2, device="cpu")
        calls.append(model.grid.group_creation_calls)
        if close:
            model.close()
        del model
        gc.collect()
    during = _resources()
    first.close()
    return {"before": before, "during": during, "after": _resources(), "calls": calls}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("close", [True, False], ids=["closed", "deleted"])
def test_repeated_constructions_add_no_groups_fds_or_threads(close: bool) -> None:
    # Pipe 2 x data 2, as in the report: each construction used to add 3 groups, 14 fds and
    # 9 threads. Now they share the first one's groups, and closing the last user frees them.
    for result in spawn_ranks(_repeated_constructions, 4, 4, close, timeout=TIMEOUT * 2):
        (fds_before, threads_before), (fds, threads) = result["before"], result["during"]
        assert fds <= fds_before, result
        assert threads == threads_before, result
        assert set(result["calls"]) == {0}, result
        if close:  # every user closed: the groups' descriptors and threads are gone
            assert result["after"][0] < fds_before, result
            assert result["after"][1] < threads, result


def _long_run(steps: int) -> tuple[int, int, tuple[int, int], tuple[int, int]]:
    torch.manual_seed(0)
    model = PipelineModule([FeedForwardBlock(4) for _ in range(2)], num_stages=1, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        loss = model(torch.randn(3, 4)).square().mean()
        loss.backward()
        model.allreduce_tied_weight_gradients()
        for parameter in model.parameters():
            assert parameter.grad is not None
            dist.all_reduce(parameter.grad, group=model.grid.axis_group("data"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    gc.collect()
    objects, resources = len(gc.get_objects()), _resources()
    for _ in range(steps):
        step()
    gc.collect()
    return objects, len(gc.get_objects()), resources, _resources()


def test_a_long_run_grows_no_objects() -> None:
    for before, after, resources_before, resources_after in spawn_ranks(
        _long_run, 2, 200, timeout=TIMEOUT
    ):
        assert after <= before + 20, (before, after)
        assert all(a <= b for a, b in zip(resources_after, resources_before, strict=True))
