"""The layout examples in the READMEs and docstrings print what they show."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import pipemodule._layout.layout

ROOT = Path(__file__).resolve().parents[3]
READMES = [ROOT / "README.md", ROOT / "packages" / "pipemodule" / "README.md"]


@pytest.mark.parametrize("readme", READMES, ids=lambda path: str(path.relative_to(ROOT)))
def test_readme_console_examples(readme: Path) -> None:
    blocks = re.findall(r"```pycon\n(.*?)```", readme.read_text(encoding="utf-8"), re.DOTALL)
    assert blocks, f"no pycon example in {readme}"
    session = "\n".join(blocks)
    test = doctest.DocTestParser().get_doctest(session, {}, readme.name, str(readme), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.tries >= 7
    assert runner.failures == 0


def test_layout_docstring_examples() -> None:
    result = doctest.testmod(pipemodule._layout.layout, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
