"""Host copies of batch rows on several threads, for the GPU pipeline's staging.

One core copies memory at roughly 5-15 GB/s; the bus that feeds a GPU moves about 50 GB/s. Feeding ``visium-uni``
(64 KiB of features and 20 KiB of predictions per spot) at the bus's speed means staging each batch into page-locked
buffers, and each batch's predictions out of them, faster than one core can. NumPy releases the GIL while it copies
plain arrays, so the rows are split across a small pool of threads (a memory-mapped bundle's pages are then also read
in parallel).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

#: Bytes below which a copy stays on the calling thread (a thread's hand-off costs more than it saves).
MIN_CHUNK_BYTES = 1 << 20
#: The most threads :func:`default_copy_threads` gives (the largest count measured; the host's memory is saturated
#: well before it).
MAX_COPY_THREADS = 16


def default_copy_threads() -> int:
    """Threads for the staging copies: ``$DEEPSPOT_COPY_THREADS`` if set, else three quarters of the cores this process
    may use (the rest drive the GPU and write the predictions out), at most :data:`MAX_COPY_THREADS`, at least 1.

    Measured on a 16-core H200 server (``benchmarks/host_path.py``, 2026-11-29): ``visium-uni`` on ``ort-cuda`` went
    from 291k to 331k spots/s with fp32 features and from 342k to 425k with fp16 features on 12 threads instead of 8;
    16 threads gave no more than 12 with fp32 features (326k) and 3% more with fp16 (436k).
    """
    from ..errors import ConfigError

    value = os.environ.get("DEEPSPOT_COPY_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"DEEPSPOT_COPY_THREADS must be a whole number of threads (1 or more), got {value!r}")
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_COPY_THREADS, cores * 3 // 4))


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool per size, shared by every pipeline of the process (threads start on first use)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="deepspot-copy")


def copy_rows(dst: np.ndarray, src: np.ndarray, threads: int = 1, check_finite: bool = False) -> int | None:
    """``dst[...] = src`` (same rows; cast as assignment casts), split by rows across ``threads`` threads, the calling
    thread among them. Returns when every row is copied; an error in any part is raised here.

    With ``check_finite``, each thread also checks the rows it has just copied (still in its cache) and the first row
    holding a NaN or inf is returned; ``None`` when every row is finite (or without the check).
    """
    rows = len(src)
    parts = min(threads, rows, max(1, src.nbytes // MIN_CHUNK_BYTES), max(1, dst.nbytes // MIN_CHUNK_BYTES))
    if parts <= 1:
        return _copy_part(dst, src, check_finite, 0)
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    futures = [_pool(threads - 1).submit(_copy_part, dst[a:b], src[a:b], check_finite, a)
               for a, b in zip(bounds[1:-1], bounds[2:])]  # fmt: skip
    try:
        first = _copy_part(dst[: bounds[1]], src[: bounds[1]], check_finite, 0)
    finally:
        wait(futures)  # every part ends before this returns or raises: no thread writes into dst afterwards
    found = [first] + [future.result() for future in futures]  # the first part's error, if one failed
    return next((row for row in found if row is not None), None)


def _copy_part(dst: np.ndarray, src: np.ndarray, check_finite: bool, offset: int) -> int | None:
    np.copyto(dst, src, casting="unsafe")
    row = first_nonfinite(dst) if check_finite else None
    return None if row is None else offset + row


def first_nonfinite(a: np.ndarray) -> int | None:
    """The index of the first row of ``a`` holding a NaN or inf, ``None`` if every row is finite."""
    bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


__all__ = ["MAX_COPY_THREADS", "MIN_CHUNK_BYTES", "copy_rows", "default_copy_threads", "first_nonfinite"]
