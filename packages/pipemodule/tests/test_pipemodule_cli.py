"""The ``pipeplan`` command: per-stage plans of a layer list, described on the meta device."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pipemodule
from pipemodule import count_parameters
from pipemodule._cli import main
from pipemodule.examples import gpt_layers
from pipepartition import PartitionPlan, plan_partition
from pipespec import describe, layer_name

GPT = "pipemodule.examples:gpt_layers"
# gpt_layers() with its defaults: vocab 256, hidden 64, depth 4.
EMBED = 256 * 64  # the tied embedding / LM head
BLOCK = 64 * 256 + 256 + 256 * 64 + 64  # FeedForwardBlock: up and down projections, biases
NORM = 2 * 64
ADAM_FP32_BYTES = 4 * (1 + 1 + 2)  # weight, gradient, two Adam moments per fp32 parameter

FACTORIES = """
import torch
from pipespec import LayerSpec, TiedLayerSpec

NUMBER = 3
LAYERS = [LayerSpec(torch.nn.Linear, 8, 8) for _ in range(4)]


def layers():
    return [LayerSpec(torch.nn.Linear, 8, 8) for _ in range(4)]


def one_layer():
    return [LayerSpec(torch.nn.Linear, 8, 8)]


def raises():
    raise RuntimeError("config file missing")


def not_a_list():
    return {"layers": 3}


def bad_layer():
    return [LayerSpec(torch.nn.Linear, 4, 4), 42]


def empty():
    return []


class NeedsValues(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = float(torch.ones(1).item())  # reads a value: impossible on meta


def needs_values():
    return [LayerSpec(NeedsValues)]


def mismatched_ties():
    return [
        TiedLayerSpec("e", torch.nn.Embedding, 8, 4),
        TiedLayerSpec("e", torch.nn.Embedding, 9, 4),
    ]
"""

# Records where its weight was allocated; 2**40 fp32 elements would be 4 TiB of real memory.
# torch.empty touches no page, so a regression fails the assertion instead of the machine.
HUGE = """
import torch
from pipespec import LayerSpec

DEVICES = []


class Huge(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n))
        DEVICES.append(self.weight.device.type)


def specs():
    return [LayerSpec(Huge, 2**40) for _ in range(2)]


def eager():
    return [Huge(2**40) for _ in range(2)]
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a uniquely named module into a fresh current directory; return its name."""
    monkeypatch.chdir(tmp_path)
    written: list[str] = []

    def write(source: str) -> str:
        name = f"pipeplan_factory_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_table_for_gpt_layers_over_four_stages(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, GPT, "--stages", "4")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{GPT}: 7 layers in 4 stages, method parameters, optimizer adam"
    # The partition plan's own table, with pipeplan's memory column before the load.
    assert cells(lines[1]) == [
        "stage",
        "layers",
        "count",
        "cost",
        "params",
        "memory",
        "load",
        "names",
    ]
    # 773 KiB = 49,472 parameters * 16 bytes; 775 KiB = 49,600 * 16.
    assert cells(lines[2]) == [
        "0",
        "0..1",
        "2",
        "49,472",
        "49,472",
        "773 KiB",
        "99.7%",
        "Embedding*, FeedForwardBlock",
    ]
    block = ["33,088", "33,088", "517 KiB", "66.7%", "FeedForwardBlock"]
    assert cells(lines[3]) == ["1", "2..2", "1", *block]
    assert cells(lines[4]) == ["2", "3..3", "1", *block]
    assert cells(lines[5]) == [
        "3",
        "4..6",
        "3",
        "49,600",
        "49,600",
        "775 KiB",
        "100.0%",
        "FeedForwardBlock, LayerNorm, Embedding*",
    ]
    assert lines[6] == "bottleneck 49,600 (stage 3), imbalance 1.201, method parameters"
    footer = "\n".join(lines[6:])
    # 49,600 over the mean stage cost 165,248 / 4.
    assert "bottleneck: stage 3 (49,600 trainable parameters); imbalance 1.201" in footer
    assert "tied 'embed' (16,384 parameters) is held by stages 0 and 3" in footer
    assert f"model: {EMBED + 4 * BLOCK + NORM:,} parameters" in footer


def test_json_matches_the_library_plan_and_counts_ties_per_holding_stage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, GPT, "--stages", "4", "--json")
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    layers = gpt_layers()
    expected = plan_partition(
        "parameters",
        4,
        names=[layer_name(layer) for layer in layers],
        parameters=[describe(layer).trainable_params for layer in layers],
    )
    assert PartitionPlan.from_dict(data["plan"]) == expected
    stages = data["stages"]
    assert [(stage["first_layer"], stage["last_layer"]) for stage in stages] == [
        (0, 1),
        (2, 2),
        (3, 3),
        (4, 6),
    ]
    assert stages[3]["names"] == ["FeedForwardBlock", "LayerNorm", "Embedding"]
    assert [stage["parameters"] for stage in stages] == [
        EMBED + BLOCK,
        BLOCK,
        BLOCK,
        BLOCK + NORM + EMBED,
    ]
    # Stages 0 and 3 each hold a copy of the tied embedding.
    assert sum(stage["parameters"] for stage in stages) == count_parameters(layers) + EMBED
    assert data["model_parameters"] == count_parameters(layers)
    assert [stage["total_bytes"] for stage in stages] == [
        ADAM_FP32_BYTES * stage["parameters"] for stage in stages
    ]
    assert [stage["tied_keys"] for stage in stages] == [["embed"], [], [], ["embed"]]
    assert data["tied"] == [
        {"key": "embed", "parameters": EMBED, "layers": [0, 6], "stages": [0, 3]}
    ]
    assert data["bottleneck"] == BLOCK + NORM + EMBED
    assert data["bottleneck_stage"] == 3
    assert data["imbalance"] == pytest.approx(expected.imbalance)
    assert data["method"] == "parameters"


def test_a_stage_holding_both_ends_of_a_tie_holds_it_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, GPT, "--stages", "1", "--json")
    assert code == 0, err
    (stage,) = json.loads(out)["stages"]
    assert stage["parameters"] == count_parameters(gpt_layers())


@pytest.mark.parametrize(
    ("optimizer", "bytes_per_parameter"),
    [("adam", 16), ("adamw", 16), ("sgd", 12), ("none", 8)],
)
def test_optimizer_state_in_the_memory(
    capsys: pytest.CaptureFixture[str], optimizer: str, bytes_per_parameter: int
) -> None:
    code, out, err = run(capsys, GPT, "--stages", "2", "--optimizer", optimizer, "--json")
    assert code == 0, err
    for stage in json.loads(out)["stages"]:
        assert stage["total_bytes"] == bytes_per_parameter * stage["parameters"]


def test_factory_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, GPT, "--stages", "3", "--arg", "depth=8", "--arg", "hidden=32", "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["arguments"] == {"depth": 8, "hidden": 32}
    assert data["num_layers"] == 11
    assert data["model_parameters"] == count_parameters(gpt_layers(hidden=32, depth=8))


def test_uniform_and_type_methods(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, GPT, "--stages", "4", "--method", "uniform", "--json")
    assert code == 0, err
    assert json.loads(out)["plan"]["boundaries"] == [0, 2, 4, 6, 7]
    code, out, err = run(capsys, GPT, "--stages", "2", "--method", "type:feedforward")
    assert code == 0, err
    assert "bottleneck: stage 0 (2 layers matching 'feedforward')" in out


def test_factory_module_in_the_current_directory(
    capsys: pytest.CaptureFixture[str], write_module: Callable[[str], str], tmp_path: Path
) -> None:
    name = write_module(FACTORIES)
    path_before = list(sys.path)
    code, out, err = run(capsys, f"{name}:layers", "--stages", "2", "--json")
    assert code == 0, err
    assert sys.path == path_before
    stages = json.loads(out)["stages"]
    assert [stage["parameters"] for stage in stages] == [2 * (8 * 8 + 8)] * 2
    # A module-level list works too, and so does a dotted module path.
    code, out, err = run(capsys, f"{name}:LAYERS", "--stages", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["num_stages"] == 4
    package = f"pipeplan_package_{uuid.uuid4().hex[:12]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "models.py").write_text(textwrap.dedent(FACTORIES))
    try:
        code, out, err = run(capsys, f"{package}.models:layers", "--stages", "2")
    finally:
        for module in [package, f"{package}.models"]:
            sys.modules.pop(module, None)
    assert code == 0, err
    assert "4 layers in 2 stages" in out


@pytest.mark.parametrize("factory", ["specs", "eager"])
def test_nothing_is_allocated(
    capsys: pytest.CaptureFixture[str], write_module: Callable[[str], str], factory: str
) -> None:
    name = write_module(HUGE)
    code, out, err = run(capsys, f"{name}:{factory}", "--stages", "2")
    assert code == 0, err
    devices = sys.modules[name].DEVICES
    assert devices  # the probe ran
    assert set(devices) == {"meta"}
    # 2**40 fp32 weights + gradients + Adam moments = 16 TiB per stage, planned without them.
    assert "16.0 TiB" in out


def test_help_documents_the_factory_forms(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "module-level list" in out
    assert "counted on each of them" in out


BAD_INPUTS = [
    (["{m}:missing"], "has no attribute 'missing'; its functions and lists are: LAYERS"),
    (["no_such_module_for_pipeplan:layers"], "no module named 'no_such_module_for_pipeplan'"),
    (["{broken}:layers"], "No module named 'not_a_real_package_for_pipeplan'"),
    (["{m}:raises"], "raised RuntimeError: config file missing"),
    (["{m}:not_a_list"], "returned a dict, not a list of layers"),
    (["{m}:NUMBER"], "is a value of type int"),
    (["{m}:bad_layer"], "layer 1 is 42"),
    (["{m}:empty"], "layers is empty"),
    (["{m}:needs_values"], "on the meta device failed"),
    (["{m}:mismatched_ties"], "tie key 'e' is used by layers 0 and 1 with different modules"),
    (["{m}:layers", "--method", "sizes"], "unknown --method 'sizes'"),
    (["{m}:layers", "--method", "type:Conv"], "'type:Conv' matches none of the 4 layer names"),
    (["{m}:layers", "--method", "type:("], "is not a valid regular expression"),
    (["{m}:layers", "--method", "profile"], "method 'profile' times every layer"),
    (["{m}:layers", "--stages", "5"], "4 layers, too few for 5 stages"),
    (["{m}:one_layer", "--stages", "2"], "has 1 layer, too few for 2 stages"),
    (["{m}:layers", "--arg", "depth=2"], "unexpected keyword argument 'depth'"),
    (["{m}:LAYERS", "--arg", "depth=2"], "takes no --arg"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_status_2(
    capsys: pytest.CaptureFixture[str],
    write_module: Callable[[str], str],
    argv: list[str],
    message: str,
) -> None:
    names = {
        "m": write_module(FACTORIES),
        "broken": write_module("import not_a_real_package_for_pipeplan\n"),
    }
    target, *options = (arg.format(**names) for arg in argv)
    code, out, err = run(capsys, target, "--stages", "1", *options)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("pipeplan: error: ")
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{m}", "--stages", "2"], "is not MODULE:FACTORY"),
        (["{m}:layers", "--stages", "0"], "'0' is not a number of stages"),
        (["{m}:layers"], "the following arguments are required: --stages"),
        (["{m}:layers", "--stages", "2", "--optimizer", "lion"], "invalid choice: 'lion'"),
        (["{m}:layers", "--stages", "2", "--arg", "depth"], "'depth' is not KEY=VALUE"),
    ],
)
def test_bad_command_line_is_one_line_and_exit_status_2(
    capsys: pytest.CaptureFixture[str],
    write_module: Callable[[str], str],
    argv: list[str],
    message: str,
) -> None:
    name = write_module(FACTORIES)
    code, out, err = run(capsys, *(arg.format(m=name) for arg in argv))
    assert code == 2
    assert out == ""
    # argparse's own errors too: one line like every other error, pointing at --help.
    assert len(err.splitlines()) == 1
    assert err.startswith("pipeplan: error: ")
    assert message in err
    assert "'pipeplan --help'" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out == f"pipeplan {pipemodule.__version__}\n"


# Records every construction; the specs differ, so none is served from a cache of equal specs.
COUNTED = """
import torch
from pipespec import LayerSpec

BUILT = []


class Counted(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n))
        BUILT.append(n)


def layers():
    return [LayerSpec(Counted, n) for n in range(1, 6)]
"""


@pytest.mark.parametrize("method", ["parameters", "uniform", "type:counted"])
@pytest.mark.parametrize("output", [[], ["--json"]])
def test_every_layer_is_described_once(
    capsys: pytest.CaptureFixture[str],
    write_module: Callable[[str], str],
    method: str,
    output: list[str],
) -> None:
    name = write_module(COUNTED)
    code, _, err = run(capsys, f"{name}:layers", "--stages", "2", "--method", method, *output)
    assert code == 0, err
    # Planning, the memory column, the ties and the model total all read one description.
    assert sys.modules[name].BUILT == [1, 2, 3, 4, 5]


def test_pipeplan_imports_only_public_names() -> None:
    package = Path(pipemodule.__file__).parent / "_cli"
    private = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                module = node.module
                if module.startswith("pipemodule._cli") or not module.startswith("pipe"):
                    continue
                names = [alias.name for alias in node.names]
                if any(part.startswith("_") for part in module.split(".")) or any(
                    name.startswith("_") and name != "__version__" for name in names
                ):
                    private.append(f"{path.name}: from {module} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                private += [
                    f"{path.name}: import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("pipe") and "._" in alias.name
                ]
    assert private == []


def test_console_script_imports_from_its_working_directory(tmp_path: Path) -> None:
    script = shutil.which("pipeplan", path=str(Path(sys.executable).parent))
    assert script is not None, (
        f"no pipeplan script next to {sys.executable}; install pipemodule into this "
        "environment (pip install -e packages/pipemodule --no-deps)"
    )
    (tmp_path / "console_factory.py").write_text(textwrap.dedent(FACTORIES))
    # Without PYTHONPATH only pipeplan itself can put the working directory on sys.path.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [script, "console_factory:layers", "--stages", "2", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    stages = json.loads(result.stdout)["stages"]
    assert [(stage["first_layer"], stage["last_layer"]) for stage in stages] == [(0, 1), (2, 3)]


def test_virtual_stages_show_their_rank_and_shared_ties(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pipemodule.examples:gpt_layers", "--stages", "2", "--arg", "depth=6"]
    assert main([*argv, "--stages-per-rank", "2", "--placement", "v"]) == 0
    out = capsys.readouterr().out
    assert "9 layers in 4 stages (2 ranks x 2, placed 'v')" in out
    header = out.splitlines()[1].split()
    assert header[:6] == ["stage", "layers", "count", "cost", "params", "rank"]
    ranks = [line.split()[5] for line in out.splitlines()[2:6]]
    assert ranks == ["0", "1", "1", "0"]
    assert "held by stages 0 and 3, one module on rank 0" in out
    assert main([*argv, "--stages-per-rank", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages_per_rank"] == 2
    assert data["placement"] == "loop"
    assert [stage["rank"] for stage in data["stages"]] == [0, 1, 0, 1]
    assert main([*argv, "--stages-per-rank", "3", "--placement", "v"]) == 2
    assert "stage_placement='v' places exactly 2 stages per rank" in capsys.readouterr().err


def test_activation_flags_add_in_flight_activation_and_peak_columns(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = (GPT, "--stages", "2", "--schedule", "1f1b", "--microbatches", "4")
    code, out, err = run(capsys, *argv, "--input-shape", "2,32")
    assert code == 0, err
    header = out.splitlines()[1]
    assert re.search(r"memory\s+in flight\s+activations\s+peak\s+load", header), header
    assert "limiting: stage 0 (rank 0)" in out
    code, out, err = run(capsys, *argv, "--input-shape", "2,32", "--json")
    assert code == 0, err
    report = json.loads(out)
    stages = report["stages"]
    assert [stage["microbatches_in_flight"] for stage in stages] == [2, 1]
    for stage in stages:
        assert stage["peak_bytes"] == stage["total_bytes"] + stage["activation_bytes"]
    assert report["schedule"] == "1F1B"
    assert report["input_dtype"] == "int64"
    assert report["limiting_stage"] == 0


def test_activation_flags_come_together(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, GPT, "--stages", "2", "--schedule", "1f1b")
    assert code == 2
    assert "add --microbatches and --input-shape" in err
    code, _, err = run(
        capsys,
        GPT,
        "--stages",
        "2",
        "--schedule",
        "1f1b",
        "--microbatches",
        "1",
        "--input-shape",
        "2,32",
    )
    assert code == 2
    assert "1F1B needs at least as many micro-batches" in err


_SMALL_GPT = ("--arg", "depth=8", "--arg", "hidden=64", "--arg", "vocab_size=1000")
_STEP = ("--schedule", "1f1b", "--microbatches", "8", "--input-shape", "4,256")


def test_memory_limit_moves_layers_off_the_stage_over_it_and_every_peak_fits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, GPT, "--stages", "4", *_SMALL_GPT, *_STEP, "--json")
    assert code == 0, err
    free = json.loads(out)
    highest = max(stage["peak_bytes"] for stage in free["stages"])
    limit = highest * 8 // 10  # the unlimited partition does not fit it
    code, out, err = run(
        capsys, GPT, "--stages", "4", *_SMALL_GPT, *_STEP, "--memory-limit", str(limit), "--json"
    )
    assert code == 0, err
    limited = json.loads(out)
    assert limited["plan"]["boundaries"] != free["plan"]["boundaries"]
    assert all(stage["peak_bytes"] <= limit for stage in limited["stages"])
    assert limited["memory_limit_bytes"] == limit
    assert {"activation_bytes", "peak_bytes"} <= set(limited["stages"][0])
    code, out, err = run(
        capsys, GPT, "--stages", "4", *_SMALL_GPT, *_STEP, "--memory-limit", str(limit)
    )
    assert code == 0, err
    assert re.search(r"limiting: stage \d \(rank \d\), peak .* of the limit .* per stage", out)


def test_a_memory_limit_no_partition_meets_names_the_stage_and_what_would_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(
        capsys, GPT, "--stages", "4", *_SMALL_GPT, "--schedule", "gpipe", "--microbatches", "8",
        "--input-shape", "4,256", "--memory-limit", "5MiB",
    )  # fmt: skip
    assert (code, out) == (2, "")
    assert re.search(
        r"stage_memory_limits of 5.00 MiB \(5,242,880 bytes\) per stage cannot hold every "
        r"stage's training peak \(schedule 'GPipe', 8 micro-batches, .*\): no partition of the "
        r"11 layers into 4 stages fits; the closest, boundaries \[.*\], needs .* more on stage "
        r"\d than its limit .*; what would fit: every limit raised by .*, more stages, "
        r"activation checkpointing .* 1F1B holds \[4, 3, 2, 1\] instead of GPipe's 8",
        err,
    ), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ("--memory-limit", "80GiB"),
            "--memory-limit caps each stage's training peak, .* add --schedule",
            id="without a schedule",
        ),
        pytest.param(
            (*_STEP, "--memory-limit", "80 parsecs"),
            "'80 parsecs' is not a byte size; write a number and a unit, e.g. 80GiB",
            id="a unit that is not one",
        ),
    ],
)
def test_memory_limit_mistakes(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    code, out, err = run(capsys, GPT, "--stages", "2", *argv)
    assert (code, out) == (2, "")
    assert re.search(message, err), err
