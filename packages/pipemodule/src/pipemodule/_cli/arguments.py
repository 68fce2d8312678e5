"""pipeplan's command line: the options, their checks, and one-line usage errors."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from pipemodule import OPTIMIZER_STATES, __version__
from pipemodule._cli.byte_sizes import parse_bytes
from pipepartition import PartitionMethod, Profile, parse_method

__all__ = ["PROG", "Options", "Target", "UsageError", "parse_arguments", "partition_method"]

PROG = "pipeplan"

_DESCRIPTION = """\
Show how a pipeline's layer list splits into stages, and what each stage holds in memory for
training, without building the model: every layer is described on the meta device (no memory,
no process group, no GPU). The partition is the one PipelineModule computes for the same
layers, method and number of stages."""

_EPILOG = """\
FACTORY is either a function that returns the layer list (called with the --arg values as
keyword arguments) or a module-level list, tuple or nn.Sequential of layers. The function is
called with torch's default device set to 'meta', so modules it builds eagerly allocate
nothing either; a list attribute is built when its module is imported. MODULE may be dotted
(pkg.models) and is imported from the current directory first, then from sys.path.

Memory per stage = parameters + gradients + optimizer state, at the parameters' dtypes:
adam/adamw keep 2 states per trainable parameter, sgd 1 (its momentum buffer), none 0 (plain
SGD). With --schedule, --microbatches and --input-shape, each stage also counts the bytes
autograd saves for one micro-batch (its layers run on meta under saved-tensor hooks) times the
micro-batches it holds at its peak in torch's order for that schedule (activation_bytes), and
peak_bytes is the sum; the footer names the stage that limits. --memory-limit SIZE (one
limit for every stage; KiB/MiB/GiB are powers of 1024, KB/MB/GB of 1000) makes the partition
the fastest one whose every stage's peak is within SIZE, or says which stage needs how much
more and what would fit. Mixed-precision master
weights and stage-boundary buffers are not included. A tied module
(TiedLayerSpec) is held by every stage that uses its key, so it is counted on each of them.

exit status: 0 success, 2 bad arguments, factory, layers or method.

example:
  pipeplan pipemodule.examples:gpt_layers --stages 4 --arg depth=24 --arg hidden=1024
  pipeplan pipemodule.examples:gpt_layers --stages 4 --schedule 1f1b --microbatches 8 \\
      --input-shape 4,2048 --memory-limit 80GiB"""


class UsageError(Exception):
    """A bad input, reported as one line on stderr with exit status 2."""


@dataclass(frozen=True)
class Target:
    """``MODULE:FACTORY``: where the layer list comes from."""

    module: str
    attribute: str

    def __str__(self) -> str:
        return f"{self.module}:{self.attribute}"


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    target: Target
    stages: int
    stages_per_rank: int
    placement: str
    method: str
    optimizer: str
    arguments: dict[str, object]
    json: bool
    schedule: str | None = None
    microbatches: int | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "int64"
    checkpoint_interval: int = 0
    memory_limit: int | None = None


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other pipeplan error; --help shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _target(text: str) -> Target:
    module, colon, attribute = text.partition(":")
    if not colon or not _dotted(module) or not _dotted(attribute):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MODULE:FACTORY; name a module and a function (or list) in it, "
            "e.g. pipemodule.examples:gpt_layers or mymodel:layers"
        )
    return Target(module, attribute)


def _stages(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of stages; pass an int >= 1, e.g. --stages 4"
        )
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; pass the sizes of one micro-batch's input, e.g. 4,2048"
        )
    return sizes


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 0")
    return value


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _keyword(text: str) -> tuple[str, object]:
    key, equals, raw = text.partition("=")
    if not equals or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE; pass e.g. --arg depth=24 or --arg name=gpt"
        )
    try:
        value: object = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # anything that is not a Python literal is a string: --arg act=gelu
    return key, value


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "factory",
        type=_target,
        metavar="MODULE:FACTORY",
        help="where the layer list comes from, e.g. pipemodule.examples:gpt_layers",
    )
    parser.add_argument(
        "--stages",
        type=_stages,
        required=True,
        metavar="N",
        help="pipeline ranks (PipelineModule's num_stages)",
    )
    parser.add_argument(
        "--stages-per-rank",
        type=_stages,
        default=1,
        metavar="V",
        help="stages each rank holds (virtual stages; default 1): the list is cut into N*V",
    )
    parser.add_argument(
        "--placement",
        choices=["loop", "v"],
        default="loop",
        help="which rank holds which stage: 'loop' (rank r: r, r+N, ...) or 'v' (V=2; rank r: "
        "r and 2N-1-r)",
    )
    parser.add_argument(
        "--method",
        default="parameters",
        metavar="METHOD",
        help="'parameters' (default: balance trainable parameters), 'uniform' (layers per "
        "stage) or 'type:REGEX' (balance the layers whose class name matches)",
    )
    parser.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZER_STATES),
        default="adam",
        help="optimizer whose state is counted in the memory column (default: adam)",
    )
    parser.add_argument(
        "--arg",
        dest="arguments",
        type=_keyword,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the factory function; VALUE is a Python literal or else a "
        "string (repeatable)",
    )
    parser.add_argument(
        "--schedule",
        metavar="NAME",
        help="torch schedule (gpipe, 1f1b, interleaved1f1b, loopedbfs, interleavedzerobubble, "
        "zbvzerobubble, dualpipev): adds each stage's saved activations at its peak",
    )
    parser.add_argument(
        "--microbatches", type=_stages, metavar="M", help="micro-batches per step (with --schedule)"
    )
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="B,S[,...]",
        help="shape of one micro-batch's input to the first layer (with --schedule)",
    )
    parser.add_argument(
        "--input-dtype",
        default="int64",
        metavar="DTYPE",
        help="dtype of that input (default int64: token ids), e.g. float32",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=_count,
        default=0,
        metavar="K",
        help="activation checkpointing in chunks of K layers (PipelineModule's "
        "activation_checkpoint_interval; default 0: off)",
    )
    parser.add_argument(
        "--memory-limit",
        type=_bytes,
        metavar="SIZE",
        help="the most each stage may hold at its training peak (parameters, gradients, "
        "optimizer state, saved activations; needs --schedule, --microbatches and "
        "--input-shape), e.g. 80GiB, 512MiB, 1.5GB (powers of 1000) or plain bytes: the "
        "partition becomes the fastest one within it",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object for tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_arguments(argv: Sequence[str] | None) -> Options:
    """The parsed command line; raises SystemExit for --help, --version and usage errors."""
    namespace = _parser().parse_args(argv)
    return Options(
        target=namespace.factory,
        stages=namespace.stages,
        stages_per_rank=namespace.stages_per_rank,
        placement=namespace.placement,
        method=namespace.method,
        optimizer=namespace.optimizer,
        arguments=dict(namespace.arguments),
        json=namespace.json,
        schedule=namespace.schedule,
        microbatches=namespace.microbatches,
        input_shape=namespace.input_shape,
        input_dtype=namespace.input_dtype,
        checkpoint_interval=namespace.checkpoint_interval,
        memory_limit=namespace.memory_limit,
    )


def partition_method(text: str) -> PartitionMethod:
    """``--method`` as a method object; the methods a command line can name, and not 'profile'."""
    try:
        method = parse_method(text)
    except ValueError as error:
        if text.strip().lower().startswith("type:"):
            raise UsageError(str(error)) from None  # says what is wrong with the pattern
        # parse_method's own message also lists method objects, which a command line cannot pass
        raise UsageError(
            f"unknown --method {text!r}; use 'parameters', 'uniform' or 'type:REGEX' (e.g. "
            "'type:Block')"
        ) from None
    if isinstance(method, Profile):
        raise UsageError(
            "method 'profile' times every layer on a real input, which pipeplan never builds; "
            "use 'parameters', 'uniform' or 'type:REGEX'"
        )
    return method
