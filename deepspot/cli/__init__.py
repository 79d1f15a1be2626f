"""The ``deepspot`` command line. Nothing in the package imports this module.

:func:`main` installs the signal handling before anything heavy is imported, so that Ctrl-C or SIGTERM at any
moment ends the run with one line and exit code 130 or 143, after the clean-up of whatever it was writing
(:mod:`deepspot.cli.signals`). The typer ``app`` and its commands are imported on first use.
"""

from __future__ import annotations

import signal
import sys

from .. import interrupts
from . import signals as _signals


def main() -> None:
    """Console-script entry point."""
    from .signals import INTERRUPTED, TERMINATED, Terminated

    _signals.forget()
    _signals.install_import_guard()
    signal.signal(signal.SIGTERM, _signals.handler(Terminated))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell made us ignore it
        signal.signal(signal.SIGINT, _signals.handler(KeyboardInterrupt))
    try:
        from .core import main as run

        _register()
        run()
    except (KeyboardInterrupt, Terminated) as e:
        _exit_stopped(type(e))
    except SystemExit as e:
        # typer turns a Ctrl-C outside a command (while it parses the options, say) into a silent exit 130; the
        # commands' own wrapper has said it already where it caught one.
        from .core import said_stopped

        if e.code in (INTERRUPTED, TERMINATED) and not said_stopped():
            print("Interrupted." if e.code == INTERRUPTED else "Terminated.", file=sys.stderr)
        raise
    except Exception:
        # An error that follows a signal is the signal's doing (a C extension swallowed the interrupt and raised
        # its own): say it as the signal, without a traceback.
        stop = interrupts.received()
        if stop is None:
            raise
        _exit_stopped(stop)


def _exit_stopped(stop: type[BaseException]) -> None:
    line, code = _signals.stopped(stop)
    print(line, file=sys.stderr)
    sys.exit(code)


def _register() -> None:
    # Each module registers its commands on `app`, in the order `deepspot --help` lists them: the path a model takes.
    from . import train, importer, export, runtime  # noqa: F401, I001


def __getattr__(name: str):
    if name == "app":
        from .core import app

        _register()
        return app
    raise AttributeError(name)


__all__ = ["app", "main"]
