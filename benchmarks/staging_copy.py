"""How fast the host stages batches: ``copy_rows`` with 1, 2, 4, ... threads, side by side in one run.

    python benchmarks/staging_copy.py [--mib 256] [--repeats 7] [--threads 1,2,4,8,12]

The GPU pipeline copies each batch's features into page-locked buffers and each batch's predictions out of them.
One core's copy (about 5-15 GB/s) is slower than the bus it feeds (about 50 GB/s), so ``copy_rows`` splits the rows
across threads. This prints each thread count's rate (median of the repeats, thread counts alternating within each
repeat) and its ratio to one thread, measured here, on this machine's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@contextlib.contextmanager
def copy_threads_env(threads: int | None):
    """``DEEPSPOT_COPY_THREADS`` set to ``threads`` (the pipeline's staging copies) for a block, restored afterwards;
    ``None`` leaves it as it is."""
    before = os.environ.get("DEEPSPOT_COPY_THREADS")
    if threads is not None:
        os.environ["DEEPSPOT_COPY_THREADS"] = str(threads)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DEEPSPOT_COPY_THREADS", None)
        else:
            os.environ["DEEPSPOT_COPY_THREADS"] = before


def measure(mib: int = 256, repeats: int = 7, threads: tuple[int, ...] | None = None) -> dict:
    """Each thread count's copy rate; ``threads`` defaults to 1, 2, 4, 8 and the default count
    (:func:`~deepspot.runtime._copy.default_copy_threads`)."""
    from deepspot.runtime._copy import copy_rows, default_copy_threads

    threads = threads or tuple(sorted({1, 2, 4, 8, default_copy_threads()}))

    rows = (mib << 20) // (16 * 1024 * 4)  # visium-uni's spots: 16 tiles x 1024 fp32 features
    src = np.random.default_rng(0).standard_normal((rows, 16, 1024), dtype=np.float32)
    dst = np.empty_like(src)
    dst[...] = src  # both touched: page faults are not timed
    times: dict[int, list[float]] = {t: [] for t in threads}
    for _ in range(repeats):
        for t in threads:  # alternating: the machine's noise hits every count alike
            start = time.perf_counter()
            copy_rows(dst, src, t)
            times[t].append(time.perf_counter() - start)
    rates = {t: src.nbytes / statistics.median(v) / 1e9 for t, v in times.items()}
    return {
        "mib": mib,
        "repeats": repeats,
        "default_threads": default_copy_threads(),
        "gb_per_s": {str(t): r for t, r in rates.items()},
        "ratio_to_one_thread": {str(t): r / rates[threads[0]] for t, r in rates.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default=None, help="Comma-separated (default 1,2,4,8 and the default count).")
    args = parser.parse_args(argv)
    threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else None
    print(json.dumps(measure(args.mib, args.repeats, threads), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
