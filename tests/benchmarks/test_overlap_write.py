"""``benchmarks/overlap_write.py``: both ways of writing predictions out give the same rows, and each is timed."""

from __future__ import annotations

import numpy as np
from _scripts import load_script


def _script():
    return load_script("overlap_write")


def test_both_ways_are_timed_side_by_side(tmp_path, capsys):
    script = _script()
    assert script.main(["--compute-ms", "1", "--genes", "64", "--batch", "32", "--batches", "6", "--repeats", "2",
                        "--json", str(tmp_path / "rows.json")]) == 0  # fmt: skip
    row = script.measure(1.0, genes=64, batch=32, batches=6, repeats=2)
    assert set(row["items_per_s"]) == {"main thread", "writer thread"}
    assert all(rate > 0 for rate in row["items_per_s"].values()) and row["ratio"] > 0
    assert "| 1 ms | 32,000 |" in capsys.readouterr().out and (tmp_path / "rows.json").exists()


def test_both_ways_write_every_row():
    from deepspot.runtime.stream import predict

    script = _script()
    device = script._Device(genes=4, compute_s=0)
    inputs = {"x": np.random.default_rng(0).standard_normal((70, 1, 64), dtype=np.float32)}
    expected = np.repeat(inputs["x"][:, 0, :1], 4, axis=1)
    main = np.full((70, 4), np.nan, np.float32)
    script._main_thread_writes(device, inputs, 32, main)
    writer = predict(script._runner(device), inputs, 32)
    np.testing.assert_array_equal(main, expected)
    np.testing.assert_array_equal(writer, expected)
