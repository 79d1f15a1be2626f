"""Checks of numeric options, shared by the library functions the commands call.

Each raises a :class:`~deepspot.errors.ConfigError` that names the option and the value and says what is allowed,
before any work is done; callers name the option with :func:`~deepspot.errors.option`, so that it reads as the
caller's Python argument or command-line flag. Kept free of NumPy and PyTorch, so that any module can use it.
"""

from __future__ import annotations

import math
import os

from .errors import ConfigError
from .errors import option as option_name

#: Compute precisions: the export's, the torch backends' and TensorRT's.
PRECISIONS = ("fp32", "fp16", "bf16")

#: Seeds that every generator deepspot seeds accepts (NumPy's legacy ``np.random.seed`` takes 32 bits).
MAX_SEED = 2**32 - 1


def at_least(value: int, option: str, minimum: int = 1) -> int:
    """``value`` if it is at least ``minimum``; else ``batch_size must be at least 1, got 0``."""
    if value < minimum:
        raise ConfigError(f"{option} must be at least {minimum}, got {value}")
    return value


def finite_at_least(value: float, option: str, minimum: float = 0.0) -> float:
    """``value`` if it is a finite number of at least ``minimum`` (NaN and infinity are refused)."""
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{option} must be a finite number of at least {minimum:g}, got {value}")
    return value


def check_seed(seed: int, option: str | None = None) -> int:
    """A seed in ``0..2**32-1``: the range that NumPy's, PyTorch's and Python's generators all take."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{option or option_name('seed')} must lie in 0..{MAX_SEED}, got {seed}")
    return seed


def check_precision(precision: str | None, option: str | None = None) -> str | None:
    """``None`` (the model's own) or one of :data:`PRECISIONS`, named exactly (``FP32`` or ``fp8`` is refused here,
    not taken for a precision that some backend lacks)."""
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r} ({option or option_name('precision')}); expected one of: "
                          f"{', '.join(PRECISIONS)}")  # fmt: skip
    return precision


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def check_threads(threads: int | None, option: str | None = None) -> int | None:
    """``None`` (the default) or a thread count in ``1..available_cpus()``: more threads than CPUs only contend."""
    if threads is None:
        return None
    cpus = available_cpus()
    if not 1 <= threads <= cpus:
        raise ConfigError(f"{option or option_name('threads')} must lie in 1..{cpus} (the CPUs this process may use), "
                          f"got {threads}")  # fmt: skip
    return threads


def _meminfo(field: str) -> int | None:
    """A field of ``/proc/meminfo`` in bytes, or ``None`` where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``), or 4 GiB where it cannot be read."""
    available = _meminfo("MemAvailable")
    return 4 << 30 if available is None else available


def check_memory(nbytes: int, what: str) -> None:
    """Refuse a request whose arrays alone (``nbytes``, a lower bound) exceed the memory and swap available now.

    Where the available memory cannot be read (not Linux), nothing is refused here.

    Args:
        nbytes: The bytes the request needs at the least.
        what: The request, with the options that size it, e.g. ``--n 100000000 items of --input-size 1024``.
    """
    available = _meminfo("MemAvailable")
    if available is None:
        return
    free = available + (_meminfo("SwapFree") or 0)
    if nbytes > free:
        raise ConfigError(
            f"not enough memory for {what}: at least {nbytes / 2**30:,.1f} GiB is needed and {free / 2**30:,.1f} GiB "
            "is available; ask for less"
        )
