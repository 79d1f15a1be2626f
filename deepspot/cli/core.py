"""The typer app and what every command shares: error handling and the version flag.

Commands live in one module per area (``train``, ``export``, ``runtime``, ``importer``) and each maps its options
onto one library call. A user's mistake (any :class:`~deepspot.errors.DeepSpotError`) becomes one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, Optional

import typer

from .. import interrupts
from .._version import __version__
from ..errors import TORCH_MODULES, DeepSpotError, DeepSpotWarning, command_line, torch_missing_message
from . import signals
from .signals import Terminated

app = typer.Typer(
    name="deepspot",
    help="DeepSpot and DeepCell: train, export to ONNX, and run high-throughput inference with verified parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: rendering it with rich costs 0.2-0.4 s of start-up on a 2-core machine (importing
    # rich.markdown and laying out panels), more than the rest of `deepspot infer --help` together.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

USER_ERROR = 2
#: Every command that writes a file replaces an existing one (atomically) unless told not to.
NO_CLOBBER_HELP = "Refuse to replace an existing output (by default an existing file is replaced)."


def fail(message: str, code: int = USER_ERROR) -> None:
    """Print ``Error: message`` on stderr and exit with ``code``."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _one_line_warnings():
    """Print deepspot's own warnings (about the user's input) as ``Warning: message``, without a source line."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeepSpotWarning):
            typer.echo(f"Warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.showwarning = show


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user's mistake into one line and exit code 2; Ctrl-C into exit code 130. Errors raised inside name the
    command's flags (``--batch-size``), not the library's arguments (``batch_size``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with command_line(), _one_line_warnings():
                return fn(*args, **kwargs)
        except (KeyboardInterrupt, Terminated) as e:
            _stop(type(e))
        except Exception as e:
            # After a Ctrl-C or SIGTERM, whatever error the interrupted code raised is the signal's doing: a C
            # extension (PyTorch reading a checkpoint, say) may have swallowed the interrupt and raised its own.
            stop = interrupts.received()
            if stop is not None and not isinstance(e, typer.Exit):
                _stop(stop)
            _fail_for(fn, e)

    return wrapper


def _stop(stop: type[BaseException]) -> None:
    """Say that the run was interrupted or terminated, and exit with that signal's code."""
    line, code = signals.stopped(stop)
    _say_stopped(line)
    raise typer.Exit(code) from None


def _fail_for(fn: Callable[..., Any], e: Exception) -> None:
    """One line and exit code 2 for a user's mistake; anything else is raised again (a bug: its traceback helps)."""
    if isinstance(e, DeepSpotError):
        fail(str(e))
    if isinstance(e, ModuleNotFoundError):
        # A serving install has no PyTorch: training, checkpoints and export say what to install, in one line.
        root = (e.name or "").partition(".")[0]
        if root in TORCH_MODULES:
            command = {"import_weights": "import"}.get(fn.__name__, fn.__name__.removesuffix("_command"))
            fail(torch_missing_message(f"deepspot {command.replace('_', ' ')}", root))
    elif isinstance(e, OSError):
        # The file system refused (no such folder, no permission, disk full): the user's to fix, in one line.
        from ..fileio import is_short_write, short_write

        where = f"{e.filename}: " if e.filename else ""
        fail(f"{where}{short_write(e) if is_short_write(e) else e.strerror or e}")
    elif isinstance(e, MemoryError):
        # The last line of defence: options are checked against the memory up front where a size is known.
        fail(_out_of_memory(e))
    elif isinstance(e, RuntimeError) and CPU_ALLOCATOR_FAILED in str(e):
        # PyTorch's CPU allocator says so with a RuntimeError, not a MemoryError.
        fail(_out_of_memory(e))
    raise e


#: What PyTorch's CPU allocator says when it cannot allocate (``RuntimeError: [enforce fail at alloc_cpu.cpp...]``).
CPU_ALLOCATOR_FAILED = "can't allocate memory"


def _out_of_memory(e: BaseException) -> str:
    """One line for an allocation that failed: what was asked for, when the error says, on its last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[-1] if lines else type(e).__name__
    if CPU_ALLOCATOR_FAILED in detail:
        detail = detail[detail.index(CPU_ALLOCATOR_FAILED) :].split(" Error code")[0].rstrip(".")
    return f"not enough memory for this request ({detail}); ask for less"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deepspot {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """DeepSpot and DeepCell: train, export to ONNX, and run high-throughput inference with verified parity."""


_stopped_said = False


def _say_stopped(message: str) -> None:
    global _stopped_said
    typer.echo(message, err=True)
    _stopped_said = True


def said_stopped() -> bool:
    """Whether a command has said that it was interrupted or terminated (its exit code alone does not tell)."""
    return _stopped_said


def main() -> None:
    """Console-script entry point (see :func:`deepspot.cli.main`)."""
    sys.exit(app(prog_name="deepspot"))
