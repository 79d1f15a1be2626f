"""Large arrays a block of rows at a time: the blocks (:func:`row_blocks`), and giving back the pages of a
memory-mapped array once a range of rows has been read or written (:func:`release_rows`).

Pages of a file mapping that a process has touched count in its resident set until the kernel needs the memory, so
streaming through a 10 GB bundle would show a 10 GB resident set although only two batches are ever in use.
``madvise(MADV_DONTNEED)`` on the rows already done drops them from this process (the file's data stays in the page
cache and, for the output's shared mapping, in the file), which keeps peak memory flat in the number of items.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

_PAGE = mmap.PAGESIZE


def row_blocks(n: int, row_bytes: int, block_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(n)`` in order, each about ``block_bytes`` of rows of ``row_bytes``
    (at least one row): how a slide-sized array is read, cast, checked or compared without a whole-size temporary."""
    step = max(1, block_bytes // max(1, row_bytes))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _mapping(a: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """The ``mmap`` behind ``a`` and that mapping's start address, or ``None`` for ordinary memory and for a private
    (copy-on-write) mapping, whose dropped pages would lose what was written to them."""
    base = a
    while isinstance(base, np.ndarray) and isinstance(base.base, np.ndarray):
        base = base.base  # up to the array made on the mapping itself (a view of a memmap is a memmap too)
    mm = getattr(base, "_mmap", None) if isinstance(base, np.memmap) else None
    if mm is None or not hasattr(mm, "madvise") or base.mode == "c":
        return None
    # np.memmap maps from the allocation-granularity boundary below its offset; the array starts inside.
    start = base.ctypes.data - (int(base.offset) % mmap.ALLOCATIONGRANULARITY)
    return mm, start


def release_rows(a: np.ndarray, start: int, stop: int) -> None:
    """Drop the pages holding rows ``start:stop`` of a memory-mapped array from this process (no-op otherwise)."""
    if stop <= start or a.ndim == 0 or a.strides[0] <= 0:
        return
    found = _mapping(a)
    if found is None:
        return
    mm, base = found
    lo = a.ctypes.data + start * a.strides[0] - base
    hi = a.ctypes.data + stop * a.strides[0] - base
    lo, hi = max(0, lo - lo % _PAGE), min(len(mm), hi + (-hi) % _PAGE)
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # not supported here: memory is then only reclaimed under pressure
            pass
