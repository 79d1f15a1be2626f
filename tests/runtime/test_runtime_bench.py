"""The benchmark harness: workloads as data, a tiny run with sane fields (never absolute times)."""

from __future__ import annotations

import json

import pytest

from deepspot.errors import ConfigError
from deepspot.runtime.bench import WORKLOADS, get_workload, peak_rss_mb, reset_peak_rss, run_bench


def test_workloads_follow_benchmarks_md():
    w = WORKLOADS["visium-uni"]
    assert (w.family, w.mode, w.input_size, w.phi2rho_size, w.n_ensemble, w.output_size) == (
        "spot",
        "subspot_neighbors",
        1024,
        512,
        10,
        5000,
    )
    assert (w.bags, w.batch_cpu, w.batch_gpu, w.tiles) == ({"subspot": 9, "neighbors": 6}, 256, 4096, 16)
    # Phi: tiles x E x D x H x 2; Rho: E x m*H x G x 2 (the reference's count) or one folded Rho.
    assert w.flops_per_item() == 16 * 10 * 1024 * 512 * 2 + 10 * 3 * 512 * 5000 * 2
    assert w.flops_per_item(folded=True) == 16 * 10 * 1024 * 512 * 2 + 3 * 512 * 5000 * 2
    assert WORKLOADS["visium-hoptimus"].input_size == 1536
    x = WORKLOADS["xenium"]
    assert (x.family, x.mode, x.input_size, x.phi2rho_size, x.output_size, x.bags, x.batch_cpu) == (
        "cell",
        "neighbors",
        1536,
        1024,
        500,
        {"neighbors": 44},
        64,
    )
    assert {WORKLOADS["visium-slide"].n_items, WORKLOADS["xenium-slide"].n_items} == {20_000, 100_000}


def test_slide_workloads_run_the_indexed_layout():
    for name in ("visium-slide", "xenium-slide"):
        assert get_workload(name).layout == "indexed"
        assert get_workload(name).quick().n_items == 2000
    with pytest.raises(ConfigError, match="unknown workload"):
        get_workload("visium")


def test_quick_bench_reports_sane_fields(tmp_path):
    report = run_bench("xenium", ["ort-cpu"], repeats=2, warmup=1, quick=True, workdir=tmp_path)
    assert [r.backend for r in report.results] == ["torch", "ort-cpu"]  # eager torch always measured, first
    for r in report.results:
        assert r.status == "ok" and r.items_per_s > 0 and r.ratio_to_torch > 0
        assert 0 < r.p50_ms <= r.p95_ms and r.peak_rss_mb > 0 and len(r.repeats_items_per_s) == 2
        assert r.gflops > 0 and r.fraction_of_gemm > 0 and r.fraction_of_bound > 0 and r.batch_size == 32
    assert report.result("torch").ratio_to_torch == pytest.approx(1.0)
    assert report.gemm_gflops > 0 and report.bound_items_per_s > 0 and report.machine["physical_cores"] >= 1
    assert report.workload["name"] == "xenium (quick)" and report.flops_per_item > report.flops_per_item_folded
    saved = json.loads(report.save(tmp_path / "bench.json").read_text())
    assert saved["results"][1]["backend"] == "ort-cpu"
    assert list(tmp_path.iterdir()) == [tmp_path / "bench.json"]  # the temporary export is gone


def test_bench_refuses_bad_arguments():
    with pytest.raises(ConfigError, match="repeats"):
        run_bench("visium-uni", ["ort-cpu"], repeats=0, quick=True)
    with pytest.raises(ConfigError, match="unknown backend"):
        run_bench("visium-uni", ["onnx"], quick=True)


def test_peak_memory_reading():
    assert peak_rss_mb() > 0
    if reset_peak_rss():
        before = peak_rss_mb()
        block = bytearray(64 << 20)  # touch 64 MiB: the high-water mark must move
        block[::4096] = b"x" * len(block[::4096])
        assert peak_rss_mb() >= before + 32
