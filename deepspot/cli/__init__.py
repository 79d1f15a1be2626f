"""The ``deepspot`` command line. Nothing in the package imports this module.

:func:`main` installs the signal handling before anything heavy is imported, so that Ctrl-C or SIGTERM at any
moment (start-up included) ends the run with one line and exit code 130 or 143, after the clean-up of whatever it
was writing. The typer ``app`` and its commands are imported on first use.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Console-script entry point."""
    from .core import INTERRUPTED, TERMINATED, Terminated, on_sigterm

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        from .core import main as run

        _register()
        run()
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Terminated:
        print("Terminated.", file=sys.stderr)
        sys.exit(TERMINATED)


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
