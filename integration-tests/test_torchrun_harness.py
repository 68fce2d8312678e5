"""The harness returns each rank's output whole, however the ranks' writes interleave."""

from __future__ import annotations

from pathlib import Path

from torchrun_harness import torchrun

# Unbuffered ranks writing to one pipe tear lines: print() writes the text and the newline
# in two calls, and another rank's text can land between them.
CHATTY = """
import os
rank = os.environ["RANK"]
for i in range(400):
    print(f"rank {rank} line {i:03d} " + "x" * 60)
"""


def test_lines_printed_by_concurrent_ranks_come_back_whole(tmp_path: Path) -> None:
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    result = torchrun(script, 2, timeout=120)
    assert result.returncode == 0, result.report()
    lines = result.stdout.splitlines()
    expected = [f"rank {r} line {i:03d} " + "x" * 60 for r in range(2) for i in range(400)]
    assert lines == expected, result.report()
