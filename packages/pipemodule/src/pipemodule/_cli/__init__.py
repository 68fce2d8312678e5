"""``pipeplan``: show how a layer list splits into pipeline stages, without building it.

The layers are described on the meta device, so planning a model far larger than this machine's
memory takes no memory, no process group and no GPU. The layout comes from
``pipemodule.plan_pipeline``, the function PipelineModule itself plans with, so the table shows
the stages a training job will get.

``arguments`` reads the command line, ``factory`` gets the layer list from ``MODULE:FACTORY``,
``report`` plans it (and writes the JSON), ``render`` writes the text.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from pipemodule._cli.arguments import PROG, UsageError, parse_arguments, partition_method
from pipemodule._cli.factory import cwd_on_path, load_layers
from pipemodule._cli.render import render
from pipemodule._cli.report import Report, activation_options, make_report, to_json

__all__ = ["main"]


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _report(argv: Sequence[str] | None) -> tuple[Report, bool]:
    options = parse_arguments(argv)
    method = partition_method(options.method)  # before the import: a typo fails fast
    with cwd_on_path():
        layers = load_layers(options.target, options.arguments)
        report = make_report(
            options.target,
            options.arguments,
            layers,
            num_stages=options.stages,
            stages_per_rank=options.stages_per_rank,
            placement=options.placement,
            method=method,
            optimizer=options.optimizer,
            activations=activation_options(options),
        )
    return report, options.json


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pipeplan`` with ``argv`` (default: the command line); return the exit status."""
    try:
        report, as_json = _report(argv)
    except SystemExit as exit_:  # usage errors (status 2), --help and --version (status 0)
        return _exit_status(exit_.code)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(to_json(report), indent=2, default=repr) if as_json else render(report)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader (e.g. `head`) stopped early; send the rest, and the flush at interpreter
        # exit, to devnull rather than printing a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
