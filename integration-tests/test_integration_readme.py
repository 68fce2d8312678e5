"""The README's quick example runs under torchrun and prints what the README shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torchrun_harness import torchrun

ROOT = Path(__file__).resolve().parents[1]


def _blocks_after(text: str, heading: str) -> tuple[str, str]:
    """The first ```python block after ``heading`` and the ```text block that follows it."""
    section = text[text.index(heading) :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, f"no python block after {heading!r}"
    output = re.search(r"```text\n(.*?)```", section[code.end() :], re.DOTALL)
    assert output is not None, f"no text block after the example under {heading!r}"
    return code.group(1), output.group(1)


def test_readme_quick_example_prints_what_the_readme_shows(tmp_path: Path) -> None:
    code, shown = _blocks_after((ROOT / "README.md").read_text(), "## Quick example")
    script = tmp_path / "quick.py"
    script.write_text(code)
    result = torchrun(script, 2, timeout=180)
    assert result.returncode == 0, result.report()
    # The README shows both ranks' lines as they happened to interleave; the harness returns
    # them rank by rank: compare the lines, not their order.
    printed = [line for line in result.stdout.splitlines() if line.strip()]
    assert sorted(printed) == sorted(line for line in shown.splitlines() if line.strip())


def _losses(text: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): loss ([\d.]+)", text)}


def test_readme_training_recipe_trains_and_saves(tmp_path: Path) -> None:
    code, shown = _blocks_after((ROOT / "README.md").read_text(), "## Training")
    script = tmp_path / "train.py"
    script.write_text(code)
    result = torchrun(script, 4, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.report()
    printed, expected = _losses(result.stdout), _losses(shown)
    assert printed.keys() == expected.keys(), result.report()
    for step, loss in expected.items():
        assert printed[step] == pytest.approx(loss, rel=0.02), (step, result.stdout)
    # gpt_layers(depth=8): 11 layers, the tied embedding saved once.
    assert len(list((tmp_path / "checkpoint").glob("layer_*-model_states.pt"))) == 10
