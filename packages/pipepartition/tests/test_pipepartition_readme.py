"""The README's examples run and print what the README shows."""

from __future__ import annotations

import doctest
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_print_what_the_readme_shows() -> None:
    results = doctest.testfile(
        str(README), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False
    )
    assert results.attempted >= 15
    assert results.failed == 0


def test_docstring_examples_hold() -> None:
    import pipepartition._balanced
    import pipepartition._methods
    import pipepartition._uniform

    for module in (pipepartition._balanced, pipepartition._methods, pipepartition._uniform):
        results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert results.failed == 0, module.__name__
