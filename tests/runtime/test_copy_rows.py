"""Staging copies on several threads (``deepspot.runtime._copy``): exact, complete, and never left running."""

from __future__ import annotations

import os

import numpy as np
import pytest

from deepspot.runtime import _copy
from deepspot.runtime._copy import MAX_COPY_THREADS, MIN_CHUNK_BYTES, copy_rows, default_copy_threads
from deepspot.runtime.pipeline import HostAdapter, run_pipeline


def test_rows_copied_on_several_threads_are_exact_with_the_cast_an_assignment_makes(tmp_path):
    rng = np.random.default_rng(0)
    src = rng.standard_normal((3001, 4, 129)).astype(np.float32)  # 6 MiB: split across the threads
    mapped = np.lib.format.open_memmap(tmp_path / "src.npy", mode="w+", dtype=np.float32, shape=src.shape)
    mapped[...] = src
    for source in (src, mapped):
        for dtype in (np.float32, np.float16):
            dst = np.full(src.shape, np.nan, dtype=dtype)
            copy_rows(dst, source, threads=4)
            expected = np.empty_like(dst)
            expected[...] = src
            np.testing.assert_array_equal(dst, expected)


def test_a_small_copy_stays_on_the_calling_thread(monkeypatch):
    monkeypatch.setattr(_copy, "_pool", lambda workers: pytest.fail("a thread for a copy under MIN_CHUNK_BYTES"))
    src = np.ones((MIN_CHUNK_BYTES // 8, 1), np.float32)  # half a chunk
    dst = np.zeros_like(src)
    copy_rows(dst, src, threads=8)
    assert (dst == 1).all()


def test_an_error_in_a_part_is_raised_after_every_part_has_ended(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    submitted = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(super().submit(fn, *args, **kwargs))
            return submitted[-1]

    pool = Recording(3)
    monkeypatch.setattr(_copy, "_pool", lambda workers: pool)
    src = np.ones((4096, 1024), np.float32)  # 16 MiB, four parts
    dst = np.zeros_like(src)
    dst.flags.writeable = False  # every part fails
    with pytest.raises(ValueError, match="read-only"):
        copy_rows(dst, src, threads=4)
    assert len(submitted) == 3 and all(f.done() for f in submitted)  # none still running once the error is raised
    pool.shutdown()


def test_the_pipeline_stages_batches_on_several_threads_and_loses_no_row():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 8, 64)).astype(np.float32)  # 2 MiB per 1000-row batch
    adapter = HostAdapter(lambda feed: {"y": feed["x"].sum(axis=(1, 2))[:, None]}, {"y": ((1,), np.dtype(np.float32))})
    got = np.full((5000, 1), np.nan, np.float32)
    for start, stop, outputs in run_pipeline({"x": x}, adapter, 1000, copy_threads=3):
        got[start:stop] = outputs["y"]
    np.testing.assert_array_equal(got[:, 0], x.sum(axis=(1, 2)))


def test_default_threads_leave_cores_for_the_rest_and_can_be_set(monkeypatch):
    from deepspot.errors import ConfigError

    monkeypatch.delenv("DEEPSPOT_COPY_THREADS", raising=False)
    for cores, threads in ((1, 1), (2, 1), (4, 3), (16, 12), (64, MAX_COPY_THREADS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_copy_threads() == threads, cores
    monkeypatch.setenv("DEEPSPOT_COPY_THREADS", "3")
    assert default_copy_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DEEPSPOT_COPY_THREADS", bad)
        with pytest.raises(ConfigError, match="DEEPSPOT_COPY_THREADS must be a whole number"):
            default_copy_threads()


@pytest.mark.parametrize("threads", [1, 4])
def test_the_copy_finds_the_first_row_that_is_not_finite(threads):
    src = np.ones((4096, 128), np.float32)  # 2 MiB: split into parts with 4 threads
    dst = np.empty_like(src)
    assert copy_rows(dst, src, threads, check_finite=True) is None
    src[3000, 5], src[3500, 0], src[100, 7] = np.inf, np.nan, -np.inf
    assert copy_rows(dst, src, threads, check_finite=True) == 100
    np.testing.assert_array_equal(dst, src)  # copied whole all the same
    assert copy_rows(dst, src, threads) is None  # without the check, nothing is looked at
