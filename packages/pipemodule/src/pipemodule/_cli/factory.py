"""Importing ``MODULE:FACTORY`` and getting the layer list from it, on the meta device."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

import pipemodule
import pipepartition
import pipespec
import pipetopo
from pipemodule._cli.arguments import PROG, Target, UsageError

__all__ = ["cwd_on_path", "load_layers", "one_line"]

_HERE = Path(__file__).resolve().parent
# Frames under these are pipestack's or torch's; the others are the user's code.
_LIBRARIES = tuple(
    Path(module.__file__).resolve().parent
    for module in (torch, pipemodule, pipepartition, pipespec, pipetopo)
    if module.__file__ is not None
)


def _under(filename: str, folders: tuple[Path, ...]) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(folder) for folder in folders)


def one_line(error: BaseException) -> str:
    """``Type: message; notes (at file:line)``, on one line."""
    text = "; ".join([str(error), *getattr(error, "__notes__", [])])
    # Where it failed: the innermost frame of the user's code, else of a library (an example
    # factory in pipemodule). None when pipeplan's own call failed (e.g. an unexpected
    # keyword), which the message already says.
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not (frame.filename.startswith("<frozen ") or _under(frame.filename, (_HERE,)))
    ]
    users = [frame for frame in frames if not _under(frame.filename, _LIBRARIES)]
    shown = (users or frames)[-1:]
    where = "".join(f" (at {frame.filename}:{frame.lineno})" for frame in shown)
    return " ".join(f"{type(error).__name__}: {text}{where}".split())


@contextmanager
def cwd_on_path() -> Iterator[None]:
    """The current directory first on sys.path while pipeplan imports and plans."""
    # As `python -m` and uvicorn do: modules in the current directory win. Removed afterwards
    # so that calling main() leaves sys.path as it was.
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if cwd in sys.path:
            sys.path.remove(cwd)


def _import(target: Target) -> ModuleType:
    importlib.invalidate_caches()  # the module may have been written just now
    try:
        return importlib.import_module(target.module)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if target.module == missing or target.module.startswith(f"{missing}."):
            raise UsageError(
                f"no module named {missing!r} in the current directory ({os.getcwd()}) or on "
                f"sys.path; run {PROG} where {target.module.split('.')[0]} lives, or install it"
            ) from error
        raise UsageError(f"importing {target.module!r} failed: {one_line(error)}") from error
    except Exception as error:  # the module's own code failed: a SyntaxError, a bad import
        raise UsageError(f"importing {target.module!r} failed: {one_line(error)}") from error


def _candidates(module: ModuleType) -> list[str]:
    """Public functions defined in ``module`` and its public lists: likely factories."""
    names = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        defined_here = getattr(value, "__module__", None) == module.__name__
        if (callable(value) and defined_here and not isinstance(value, type)) or isinstance(
            value, list | tuple | torch.nn.Sequential
        ):
            names.append(name)
    return sorted(names)


def _resolve(module: ModuleType, target: Target) -> object:
    found: object = module
    for part in target.attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            candidates = _candidates(module)
            hint = (
                f"its functions and lists are: {', '.join(candidates[:10])}"
                if candidates
                else "it defines no public function or list"
            )
            raise UsageError(
                f"module {target.module!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {target.attribute!r}; {hint}"
            ) from None
    return found


def _layers_from(
    found: object, target: Target, arguments: dict[str, object]
) -> Sequence[pipespec.Layer]:
    if isinstance(found, list | tuple | torch.nn.Sequential):
        if arguments:
            raise UsageError(
                f"{target} is a {type(found).__name__}, not a function, so it takes no --arg; "
                "drop --arg or name a function that returns the layer list"
            )
        return tuple(found)
    if isinstance(found, torch.nn.Module):
        raise UsageError(
            f"{target} is a {type(found).__name__} module, not a layer list; name a function "
            "that returns the list of layers (LayerSpec, TiedLayerSpec, modules, callables)"
        )
    if not callable(found):
        raise UsageError(
            f"{target} is a value of type {type(found).__name__}, neither a function that "
            "returns the layer list nor a list of layers"
        )
    call = f"{target}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"
    try:
        with torch.device("meta"):  # eagerly built modules allocate nothing either
            layers = found(**arguments)
    except Exception as error:
        raise UsageError(f"{call} raised {one_line(error)}") from error
    if not isinstance(layers, list | tuple | torch.nn.Sequential):
        raise UsageError(
            f"{call} returned a {type(layers).__name__}, not a list of layers; return a list "
            "of LayerSpec, TiedLayerSpec, modules or callables"
        )
    return tuple(layers)


def load_layers(target: Target, arguments: dict[str, object]) -> Sequence[pipespec.Layer]:
    """The layer list ``target`` names, unchecked; call inside :func:`cwd_on_path`."""
    return _layers_from(_resolve(_import(target), target), target, arguments)
