"""Ctrl-C and SIGTERM in the command line: the handlers, and what they remember.

The handlers raise :class:`KeyboardInterrupt` or :class:`Terminated` in the main thread. An interrupt that arrives
while the main thread imports a module (PyTorch, NumPy, onnxruntime: a C extension that is interrupted
half-initialised fails with an ``ImportError`` traceback) is held until that import has finished.

Some C extensions swallow the exception a handler raised inside them and raise their own: PyTorch, building a tensor
from a buffer, answers a :class:`KeyboardInterrupt` with ``ValueError: could not determine the shape of object
type ...``, which a loader then reports as an unreadable file. So the handlers also note the signal
(:func:`deepspot.interrupts.received`), and the commands' error handling treats any error that follows a signal as that
signal.
"""

from __future__ import annotations

import builtins
import threading

from .. import interrupts

#: Exit codes of a run stopped by Ctrl-C (SIGINT) and by a scheduler (SIGTERM: SLURM at its time limit, preemption).
INTERRUPTED, TERMINATED = 130, 143


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that a terminated run cleans up as an interrupted one does."""


def stopped(stop: type[BaseException]) -> tuple[str, int]:
    """The line a run stopped by ``stop`` (``KeyboardInterrupt`` or ``Terminated``) says, and its exit code."""
    return ("Terminated.", TERMINATED) if stop is Terminated else ("Interrupted.", INTERRUPTED)


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
            interrupts.note(exc)
            if cls.depth > 0:
                cls.pending = cls.pending or exc
            else:
                raise exc()

        return handle


def handler(exc: type[BaseException]):
    """A signal handler that raises ``exc`` in the main thread (held while the main thread imports)."""
    return _Interrupts.handler(exc)


def install_import_guard() -> None:
    """Hold the handlers' exceptions while the main thread imports a module."""
    builtins.__import__ = _Interrupts.guarded_import


def forget() -> None:
    """Forget a signal handled earlier (for a process that runs more than one command)."""
    interrupts.forget()
    _Interrupts.pending = None
