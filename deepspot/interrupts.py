"""Which stop signal this process has received, for code that must not take a library's error for the user's.

A signal handler raises its exception (``KeyboardInterrupt``, the CLI's ``Terminated``, a cohort worker's stop) in
the main thread, wherever it is. Some C extensions swallow it and raise their own error instead: PyTorch, building a
tensor from a buffer, answers a ``KeyboardInterrupt`` with ``ValueError: could not determine the shape of object
type ...``. The handlers therefore :func:`note` the exception here, and code that turns errors into results (the CLI's
one-line errors, a cohort's failed slides) asks :func:`received` first. Without such a handler (a library call under
Python's default one) nothing is noted. No dependencies: the runtime and the CLI both use it.
"""

from __future__ import annotations

_received: type[BaseException] | None = None


def note(exc: type[BaseException]) -> None:
    """Remember that a stop signal arrived, as the exception its handler raises (the first one is kept)."""
    global _received
    _received = _received or exc


def received() -> type[BaseException] | None:
    """The exception of the first stop signal noted in this process, or ``None``."""
    return _received


def forget() -> None:
    """Forget a signal noted earlier (a process that runs more than one command)."""
    global _received
    _received = None
