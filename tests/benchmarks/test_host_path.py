"""``benchmarks/host_path.py``: predict's host side alone, timed on each copy-thread count it names."""

from __future__ import annotations

import json
import os

import pytest
from _scripts import load_script


def test_host_rows_run_predict_on_the_threads_they_name(tmp_path, capsys, monkeypatch):
    import deepspot.runtime._copy as copy_module
    import deepspot.runtime.stream as stream

    script = load_script("host_path")
    seen = []
    real = copy_module.default_copy_threads

    def counted():
        seen.append(real())
        return seen[-1]

    monkeypatch.setattr(stream, "default_copy_threads", counted)
    monkeypatch.setenv("DEEPSPOT_COPY_THREADS", "5")
    out = tmp_path / "rows.json"
    assert (
        script.main(["--items", "96", "--batch", "32", "--threads", "1,2", "--repeats", "2", "--json", str(out)]) == 0
    )
    assert os.environ["DEEPSPOT_COPY_THREADS"] == "5"  # restored
    assert set(seen) == {1, 2}  # each row's predict staged on its own count
    result = json.loads(out.read_text())
    host = {k: v for k, v in result["rows"].items() if k.startswith("host copies alone")}
    assert host.keys() == {
        f"host copies alone, {f} features, {t} copy threads" for f in ("fp32", "fp16") for t in (1, 2)
    }
    for name, row in result["rows"].items():
        assert row["items_per_s"] > 0, name
        per_item = 16 * 1024 * (2 if "fp16" in name else 4)  # visium-uni: 16 tiles x 1024 features
        assert row["input_bytes_per_item"] == per_item and row["output_bytes_per_item"] == 5000 * 4
    assert "| host copies alone, fp16 features, 2 copy threads |" in capsys.readouterr().out
    has_cuda, why = script.cuda_available()
    if not has_cuda:  # no GPU: the rows through the bus say why they are missing, and no fraction is made up
        assert result["bus_no_compute"] == why and result["pinned_gb_per_s"] is None
        assert result["rows"].keys() == host.keys()
        assert all(row["fraction_of_limit"] is None for row in result["rows"].values())


def test_thread_counts_that_are_not_counts_are_a_usage_error(capsys):
    script = load_script("host_path")
    for bad in ("x", "8,0", "8,,12"):
        with pytest.raises(SystemExit) as stopped:
            script.main(["--threads", bad])
        assert stopped.value.code == 2, bad
        assert "expected thread counts such as 8,12,16" in capsys.readouterr().err
