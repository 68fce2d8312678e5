"""The examples in the README and in docstrings print what they claim."""

from __future__ import annotations

import doctest
import re
from pathlib import Path
from types import ModuleType

import pytest

import pipetopo._coord
import pipetopo._topology
import pipetopo.testing

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_console_examples() -> None:
    blocks = re.findall(r"```pycon\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) >= 3
    # One session: later blocks build on names defined in earlier ones, as a reader would.
    session = "\n".join(blocks)
    test = doctest.DocTestParser().get_doctest(session, {}, "README", str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.tries > 10
    assert runner.failures == 0


@pytest.mark.parametrize("module", [pipetopo._coord, pipetopo._topology, pipetopo.testing])
def test_docstring_examples(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
