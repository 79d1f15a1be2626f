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
    assert report.machine["gemm_library"].startswith(("torch ", "numpy "))  # which BLAS measured the GEMM rate
    assert report.workload["name"] == "xenium (quick)" and report.flops_per_item > report.flops_per_item_folded
    saved = json.loads(report.save(tmp_path / "bench.json").read_text())
    assert saved["results"][1]["backend"] == "ort-cpu"
    assert list(tmp_path.iterdir()) == [tmp_path / "bench.json"]  # the temporary export is gone


def test_bench_puts_the_callers_torch_threads_back(tmp_path):
    # It runs on the physical cores; a notebook that had set its own thread count kept the benchmark's.
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        run_bench("xenium", ["ort-cpu"], repeats=1, warmup=0, quick=True, workdir=tmp_path)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


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


def test_the_bus_bandwidth_probe_copies_through_the_cuda_runtime_and_frees_what_it_took():
    from .graph_replay import HostCuda

    from deepspot.runtime.bench_common import bus_bandwidth, bus_fraction

    cuda = HostCuda()
    bus = bus_bandwidth(nbytes=1 << 20, repeats=3, cuda=cuda)
    assert set(bus) == {"pinned_gb_per_s", "pageable_gb_per_s"} and all(v > 0 for v in bus.values())
    assert cuda.copies == 2 * 4 and not cuda.host and not cuda.device  # warm-up + 3 each; all freed
    # 50 GB/s and 64 KiB per item (visium-uni in fp32): about 763k items/s is the bus-fed limit.
    assert bus_fraction(381_470, 65536, 50.0) == pytest.approx(0.5, rel=1e-4)
    assert bus_fraction(1.0, 65536, None) is None


def test_a_gpu_backend_streams_batches_and_is_measured_against_the_bus(tmp_path):
    """On a GPU the bench streams several batches per repeat through predict() and reports the fraction of the
    bus-fed limit instead of the CPU's GEMM. A CPU runner that says it is on a GPU stands in for one here."""
    from deepspot.cli.runtime import print_bench
    from deepspot.runtime.bench import _measure
    from deepspot.runtime.torch_runner import TorchRunner

    w = get_workload("visium-uni").quick()
    model = w.build_model(0)
    streamed = []

    class StandInGpu(TorchRunner):
        device = "cuda:0"

        def infer(self, feed, check_inputs=True):
            streamed.append(len(next(iter(feed.values()))))
            return super().infer(feed, check_inputs)

    batch = 16
    runners = {
        "torch": (TorchRunner(model).activate(), w.inputs(batch, 0), batch),
        "gpu": (StandInGpu(model, name="stand-in").activate(), w.inputs(4 * batch, 0), batch),
    }
    bus = {"pinned_gb_per_s": 50.0, "pageable_gb_per_s": 10.0}
    report = _measure(w, runners, repeats=2, warmup=1, bus=bus)
    cpu, gpu = report.results
    assert streamed and set(streamed) == {batch}  # batches of 16 through predict(), not one call of 64 items
    assert len(streamed) == 4 * (1 + 2)  # four batches in the warm-up and in each repeat
    per_item = sum(a[:1].nbytes for a in runners["gpu"][1].values())
    assert gpu.input_bytes_per_item == per_item == w.tiles * w.input_size * 4
    assert gpu.fraction_of_bus == pytest.approx(gpu.items_per_s * per_item / 50e9)
    assert gpu.fraction_of_gemm is None and gpu.fraction_of_bound is None
    assert cpu.fraction_of_bus is None and cpu.fraction_of_gemm > 0 and report.bus_gb_per_s == bus
    print_bench(report)  # renders the GPU row's "-" and the bus column without failing
    for runner, _, _ in runners.values():
        runner.deactivate()


def test_a_gpu_slide_benchmark_streams_the_eager_baseline_through_the_pipeline(monkeypatch):
    """On a GPU the whole-slide bench sets the indexed backends beside eager PyTorch on the same GPU; that baseline
    must be timed as the per-item bench times it there (several batches through predict(), the overlapping pipeline),
    not as one batch copied and computed in turn. A CPU runner that says it is on a GPU stands in for one here."""
    from deepspot.runtime import slide_bench, torch_runner
    from deepspot.runtime.bench import GPU_STREAM_BATCHES

    seen: list[int] = []

    class StandInGpu(torch_runner.TorchRunner):
        def __init__(self, model, device="cpu", **kw):
            super().__init__(model, device="cpu", **kw)

        @property
        def device(self) -> str:
            return "cuda:0"

        def infer(self, feed, check_inputs=True):
            seen.append(len(next(iter(feed.values()))))
            return super().infer(feed, check_inputs)

    monkeypatch.setattr(slide_bench, "baseline_device", lambda on_gpu, torch_cuda: "cuda")
    monkeypatch.setattr(torch_runner, "TorchRunner", StandInGpu)
    w = get_workload("xenium-slide").quick()
    report = run_bench(w, ["torch"], repeats=2, warmup=1, n_items=GPU_STREAM_BATCHES * w.batch_gpu + 10)
    base = report.results[0]
    assert report.baseline == base.backend == "torch-cuda (eager, per-item)" and base.batch_size == w.batch_gpu
    assert report.machine["gemm_library"].startswith(("torch ", "numpy "))
    # warm-up and both repeats: the workload's GPU batch, GPU_STREAM_BATCHES of them each time
    assert seen == [w.batch_gpu] * GPU_STREAM_BATCHES * 3


def test_run_bench_s_errors_name_its_arguments_from_python_and_its_flags_from_the_command_line():
    from typer.testing import CliRunner

    from deepspot.cli import app

    from _cli import error_line

    with pytest.raises(ConfigError) as e:
        run_bench("visium-uni", quick=True, repeats=0)
    assert str(e.value) == "repeats must be at least 1, got 0"
    with pytest.raises(ConfigError, match="^cli times `deepspot infer` on a whole slide"):
        run_bench("visium-uni", quick=True, cli=True)
    cli = CliRunner()
    assert error_line(cli.invoke(app, ["bench", "--quick", "--repeats", "0"])) == (
        "Error: --repeats must be at least 1, got 0"
    )
    error_line(cli.invoke(app, ["bench", "--quick", "--cli"]), "Error: --cli times `deepspot infer` on a whole slide")
