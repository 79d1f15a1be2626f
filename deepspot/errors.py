"""Errors raised for a user's mistake.

Every error a user can cause (a wrong shape, a missing file, a wrong mode) derives from :class:`DeepSpotError`, so
the CLI can print it as one line and exit with code 2 instead of showing a traceback. Shape errors are also
``ValueError`` so that Python callers can catch them the usual way.

An error names the option to change as the caller wrote it: the Python argument (``batch_size``) when a library
function was called, the flag (``--batch-size``) when the command line ran it (:func:`command_line`, :func:`option`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path


class DeepSpotError(Exception):
    """Base class of every error caused by the user's input."""


class InputError(DeepSpotError, ValueError):
    """An input has the wrong name, shape, dtype or values."""


class ConfigError(DeepSpotError, ValueError):
    """An unknown mode, family, loss or an invalid constructor argument."""


class CheckpointError(DeepSpotError):
    """A checkpoint or model file is missing, truncated, foreign or refused."""


class BackendUnavailableError(DeepSpotError):
    """A requested backend needs a package or hardware that is not there."""


#: Whether the current call comes from the command line; a context variable, so threads and tests each see their own.
_FROM_CLI: ContextVar[bool] = ContextVar("deepspot_from_cli", default=False)


@contextlib.contextmanager
def command_line(on: bool = True) -> Iterator[None]:
    """Within it, errors name command-line flags instead of Python arguments. The CLI runs every command in it; a
    cohort's worker processes, which start with a fresh context, enter it when their cohort came from the CLI."""
    token = _FROM_CLI.set(on)
    try:
        yield
    finally:
        _FROM_CLI.reset(token)


def from_command_line() -> bool:
    """Whether the current call comes from the command line (see :func:`command_line`)."""
    return _FROM_CLI.get()


def option(name: str, cli: str | None = None) -> str:
    """An option as an error names it: the Python argument ``name`` (``batch_size``), or on the command line its
    flag: ``cli`` where the flag is spelt otherwise (``--random`` for ``n_random``), else ``--batch-size``."""
    if not _FROM_CLI.get():
        return name
    return cli or "--" + name.replace("_", "-")


def option_value(name: str, value: object, cli: str | None = None) -> str:
    """An option with a value, as advice gives it: ``layout='indexed'`` in Python, ``--layout indexed`` on the
    command line; a switch is its flag alone there (``cli='--no-validate'`` for ``validate=False``)."""
    if not _FROM_CLI.get():
        return f"{name}={value!r}"
    flag = option(name, cli)
    return flag if isinstance(value, bool) else f"{flag} {value}"


def advice(python: str, cli: str) -> str:
    """Advice that names another step, as the caller would take it: its Python call, or on the command line its
    command (``deepspot.layout.write_bundle(..., index=True)`` or ``deepspot bundle --index``)."""
    return cli if _FROM_CLI.get() else python


class DeepSpotWarning(UserWarning):
    """Something in the user's input deepspot goes on without, said once (the CLI prints it as one line)."""


class UnusedInputWarning(DeepSpotWarning):
    """A bundle holds an array the model does not take."""


TORCH_EXTRA = "pip install 'deepspot[torch]'"
TORCH_MODULES = ("torch", "safetensors", "matplotlib")


def torch_missing_message(what: str, module: str = "torch") -> str:
    """The one line for a command that needs PyTorch (or another part of the ``torch`` extra) where it is missing."""
    return (
        f"{what} needs PyTorch, and {module} is not installed: {TORCH_EXTRA} (on a GPU server, install your CUDA "
        "build of torch first); running exported .onnx models needs no PyTorch"
    )


#: The checkpoint ``deepspot train`` writes into its output folder.
TRAINED_CHECKPOINT = "model.safetensors"


def folder_hint(path) -> str:
    """What to add when the folder ``deepspot train`` writes is given for a model file: the checkpoint in it to pass
    (``''`` for any other path)."""
    path = Path(path)
    if path.is_dir() and (path / TRAINED_CHECKPOINT).is_file():
        return f"; it is the folder `deepspot train` writes: pass {path / TRAINED_CHECKPOINT}"
    return ""


def require_torch(what: str):
    """``torch``, or a :class:`BackendUnavailableError` that says what to install."""
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError(torch_missing_message(what)) from None
    return torch
