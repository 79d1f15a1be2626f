"""The ``deepspot`` command line. Nothing in the package imports this module.

:func:`main` installs the signal handling before anything heavy is imported, so that Ctrl-C or SIGTERM at any
moment ends the run with one line and exit code 130 or 143, after the clean-up of whatever it was writing. An
interrupt that arrives while the main thread imports a module (PyTorch, NumPy, onnxruntime: a C extension that is
interrupted half-initialised fails with an ``ImportError`` traceback) is held until that import has finished. The
typer ``app`` and its commands are imported on first use.
"""

from __future__ import annotations

import builtins
import signal
import sys
import threading


class _Interrupts:
    """Signals that arrive during an import of the main thread, held until the outermost import returns."""

    depth = 0
    pending: type[BaseException] | None = None
    original_import = builtins.__import__

    @classmethod
    def guarded_import(cls, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return cls.original_import(*args, **kwargs)
        cls.depth += 1
        try:
            return cls.original_import(*args, **kwargs)
        finally:
            cls.depth -= 1
            if cls.depth == 0 and cls.pending is not None:
                exc, cls.pending = cls.pending, None
                raise exc()

    @classmethod
    def handler(cls, exc: type[BaseException]):
        def handle(signum, frame) -> None:
            if cls.depth > 0:
                cls.pending = cls.pending or exc
            else:
                raise exc()

        return handle


def main() -> None:
    """Console-script entry point."""
    from .core import INTERRUPTED, TERMINATED, Terminated

    builtins.__import__ = _Interrupts.guarded_import
    signal.signal(signal.SIGTERM, _Interrupts.handler(Terminated))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell made us ignore it
        signal.signal(signal.SIGINT, _Interrupts.handler(KeyboardInterrupt))
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
    except SystemExit as e:
        # typer turns a Ctrl-C outside a command (while it parses the options, say) into a silent exit 130; the
        # commands' own wrapper has said it already where it caught one.
        from .core import said_stopped

        if e.code in (INTERRUPTED, TERMINATED) and not said_stopped():
            print("Interrupted." if e.code == INTERRUPTED else "Terminated.", file=sys.stderr)
        raise


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
