"""``deepspot bench``: the workloads of BENCHMARKS.md, every backend side by side with the eager PyTorch model.

Machines here are shared and noisy, so the figure that counts is the ratio to eager PyTorch measured in the same
process, on the same inputs, with the backends' timed runs alternating; absolute items/s are kept for the record.
Each backend gets warm-up runs, then ``repeats`` timed repeats; throughput is the median over repeats, latency the
p50 and p95 over every timed batch. The machine's own fp32 GEMM rate is measured in the same run, and the fraction
of it achieved is reported with the FLOPs per item as BENCHMARKS.md defines them. On a GPU the bus is the limit
(BENCHMARKS.md): GPU backends are set beside eager PyTorch on the same GPU and against the bus-fed limit, from the
host-to-device bandwidth measured in the same run.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..checks import at_least
from ..errors import ConfigError, option, option_value
from .bench_common import (  # noqa: F401  (moved to bench_common; re-exported, the names users import from here)
    GPU_STREAM_BATCHES,
    WORKLOADS,
    BackendResult,
    BenchReport,
    Gemm,
    Workload,
    backend_result,
    bus_bandwidth,
    bus_figures,
    computes_folded,
    gemm_rate,
    get_workload,
    machine_info,
    peak_rss_mb,
    peak_rss_scope,
    reset_peak_rss,
)


def _keeps_torch_threads(fn):
    """The benchmarks run PyTorch on the physical cores; put the caller's thread setting back when they end."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch = sys.modules.get("torch")  # not imported: nothing set yet, and none needed for ONNX-only runs
        threads = torch.get_num_threads() if torch is not None else None
        try:
            return fn(*args, **kwargs)
        finally:
            if threads is not None:
                torch.set_num_threads(threads)

    return wrapper


@_keeps_torch_threads
def run_bench(
    workload: str | Workload = "visium-uni",
    backends: tuple[str, ...] | list[str] = ("torch", "ort-cpu"),
    batch_size: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    quick: bool = False,
    seed: int = 0,
    options: Any = None,
    allow_fallback: bool = False,
    model: Any = None,
    workdir: str | Path | None = None,
    n_items: int | None = None,
    cli: bool = False,
) -> BenchReport:
    """Benchmark ``backends`` on a workload, alternating with the eager PyTorch model in the same process.

    Args:
        workload: A name from :data:`WORKLOADS` or a :class:`Workload`.
        backends: Backends to measure. The eager model is always added as the baseline: on the CPU (``torch``), or
            on the GPU (``torch-cuda (eager)``) when a GPU backend is measured and PyTorch sees the GPU. A GPU backend
            streams several batches per repeat through the overlapping pipeline and is set against the bus-fed
            limit, with the host-to-device bandwidth measured in the same run.
        batch_size: Items per batch; default the workload's CPU or GPU batch, per backend.
        repeats: Timed repeats per backend (the median is reported; BENCHMARKS.md asks for at least 5).
        warmup: Untimed runs per backend first.
        quick: Shrink the workload to toy sizes (same structure), for tests and smoke runs.
        seed: Seed of the random weights and inputs.
        options: :class:`~deepspot.runtime.backends.RunnerOptions` (device, precision, threads).
        allow_fallback: Permit another backend when one cannot run here.
        model: Benchmark this model instead of the workload's random weights (its sizes must match). An ``.onnx``
            file (a per-item export) compares ONNX backends with each other, without PyTorch: the first backend is
            the baseline, and the workload's bag sizes and batch are used at the model's own sizes.
        workdir: Where the temporary ONNX export goes (default: the system's temporary folder).
        n_items: Whole-slide workloads: items on the slide (default: the workload's; quick: 2,000).
        cli: Whole-slide workloads: also time ``deepspot infer`` end to end in a subprocess, start-up included, for
            each ONNX backend (a row beside the in-process one).
    """
    from .artifacts import artifact_kind
    from .backends import BACKENDS, RunnerOptions, get_backend, load_runner
    from .ort import physical_cores

    w = get_workload(workload) if isinstance(workload, str) else workload
    w = w.quick() if quick else w
    at_least(repeats, option("repeats"))
    at_least(warmup, option("warmup"), 0)
    if batch_size is not None:
        at_least(batch_size, option("batch_size"))
    if isinstance(model, (str, Path)) and artifact_kind(model) == "onnx":
        return _bench_onnx(w, Path(model), backends, batch_size, repeats, warmup, seed, options, allow_fallback)
    from ..errors import require_torch

    torch = require_torch(f"bench with eager PyTorch as the baseline (or {option_value('model', 'MODEL.onnx')} to "
                          "compare ONNX backends)")  # fmt: skip
    from ..export import export_onnx
    from .torch_runner import TorchRunner
    if w.layout == "indexed":
        from .slide_bench import run_slide_bench

        return run_slide_bench(w, backends, batch_size, repeats, warmup, seed, options, allow_fallback, model,
                               workdir, n_items=n_items, cli=cli)  # fmt: skip
    if cli:
        raise ConfigError(f"{option('cli')} times `deepspot infer` on a whole slide: use it with visium-slide or "
                          "xenium-slide")  # fmt: skip
    requested = list(dict.fromkeys(backends))
    for name in requested:
        get_backend(name)
    # The baseline: eager PyTorch on the CPU, or on the GPU when GPU backends are measured (BENCHMARKS.md sets GPU
    # figures beside eager PyTorch on the same GPU); a CPU build of PyTorch keeps it on the CPU, named so.
    gpu = any(BACKENDS[name].device == "cuda" for name in requested)
    device = (options or RunnerOptions()).device
    base = EAGER_GPU if gpu and torch.cuda.is_available() else "torch"
    names = [base] + [name for name in requested if name != base]
    torch.set_num_threads(physical_cores())
    model = model if model is not None else w.build_model(seed)
    runners: dict[str, Any] = {}
    feeds = _feeds(w, seed)
    with tempfile.TemporaryDirectory(prefix="deepspot-bench-", dir=workdir) as tmp:
        onnx_path = None
        if any(BACKENDS[n].runs == "onnx" for n in names if n != EAGER_GPU):
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(model, onnx_path, validate=False)
        try:
            for name in names:
                cuda = name == EAGER_GPU or BACKENDS[name].device == "cuda"
                batch = batch_size or (w.batch_gpu if cuda else w.batch_cpu)
                o = replace(options or RunnerOptions(), batch_size=batch, bag_sizes=dict(w.bags))
                if name == EAGER_GPU:
                    runner = TorchRunner(model, device=f"cuda:{device}", name=EAGER_GPU)
                elif name == "torch":
                    runner = TorchRunner(model)
                else:
                    source = model if BACKENDS[name].runs == "model" else onnx_path
                    runner = load_runner(source, name, o, allow_fallback)
                runners[name] = (runner.activate(), feeds(batch * (GPU_STREAM_BATCHES if cuda else 1)), batch)
            return _measure(w, runners, repeats, warmup, baseline=base)
        finally:
            for runner, _, _ in runners.values():
                runner.deactivate()


#: The eager baseline's name when GPU backends are measured.
EAGER_GPU = "torch-cuda (eager)"


def _feeds(w: Workload, seed: int):
    """The workload's seeded inputs by number of items, made once and shared by the backends that take as many."""
    return functools.cache(lambda n: w.inputs(n, seed))


def _bench_onnx(w: Workload, path: Path, backends, batch_size, repeats, warmup, seed, options, allow_fallback):
    """ONNX backends on an exported model, against each other (the first is the baseline); no PyTorch needed."""
    from .artifacts import read_onnx
    from .backends import BACKENDS, RunnerOptions, get_backend, load_runner

    if w.layout == "indexed":
        raise ConfigError(f"{path}: whole-slide workloads build their own indexed export; give a per-item workload")
    names = list(dict.fromkeys(backends))
    if not names:
        raise ConfigError("give at least one backend to benchmark")
    for name in names:
        if get_backend(name).runs != "onnx":
            raise ConfigError(f"backend {name!r} runs a checkpoint, not {path.name}; compare ONNX backends here")
    info, _ = read_onnx(path)
    if info is None:
        raise ConfigError(f"{path}: not exported by deepspot (no model metadata), so its inputs' sizes are unknown")
    if info.layout != "dense":
        raise ConfigError(f"{path}: a graph of the indexed layout; benchmark the per-item export")
    mode = info.mode_spec
    default_bags = {"subspot": 9, "neighbors": 6}  # the reference's, where the workload has no such bag
    bags = {b.name: w.bags.get(b.name, default_bags.get(b.name, 4)) for b in mode.bags if not b.single}
    w = replace(w, name=f"{w.name} ({path.name})", family=info.family, mode=info.mode, input_size=info.input_size,
                output_size=info.output_size, bags=bags,
                phi2rho_size=int(info.config.get("phi2rho_size") or w.phi2rho_size),
                n_ensemble=int(info.config.get("n_ensemble") or w.n_ensemble))  # fmt: skip
    runners: dict[str, Any] = {}
    feeds = _feeds(w, seed)
    try:
        for name in names:
            cuda = BACKENDS[name].device == "cuda"
            batch = batch_size or (w.batch_gpu if cuda else w.batch_cpu)
            o = replace(options or RunnerOptions(), batch_size=batch, bag_sizes=dict(w.bags))
            feed = feeds(batch * (GPU_STREAM_BATCHES if cuda else 1))
            runners[name] = (load_runner(path, name, o, allow_fallback).activate(), feed, batch)
        return _measure(w, runners, repeats, warmup, baseline=names[0])
    finally:
        for runner, _, _ in runners.values():
            runner.deactivate()


def _measure(w: Workload, runners: dict[str, Any], repeats: int, warmup: int, baseline: str = "torch",
             bus: dict[str, float] | None = None) -> BenchReport:  # fmt: skip
    """Time each runner, alternating. ``runners``: name -> (runner, feed, batch). A CPU runner runs its one batch per
    repeat; a GPU runner streams its feed (several batches) through :func:`~deepspot.runtime.stream.predict`, the
    overlapping pipeline, and its row gets the fraction of the bus-fed limit, with the host-to-device bandwidth
    measured in the same run (``bus``: given, for tests)."""
    from .stream import predict

    def run(runner, feed, batch, check: bool = False) -> None:
        if runner.device.startswith("cuda"):
            predict(runner, feed, batch)  # checks its first batch
        else:
            runner.infer(feed, check_inputs=check)

    for runner, feed, batch in runners.values():
        for i in range(warmup):
            run(runner, feed, batch, check=i == 0)
    gpu = [runner.device for runner, _, _ in runners.values() if runner.device.startswith("cuda")]
    if gpu and bus is None:
        bus = bus_bandwidth(int(gpu[0].partition(":")[2] or 0))
    per_repeat: dict[str, list[float]] = {name: [] for name in runners}
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, float] = {name: 0.0 for name in runners}
    scoped = True
    gemm_probe = Gemm()
    for _ in range(repeats):
        gemm_probe.time_once()  # the GEMM rate is sampled between the backends' runs, under the same noise
        for name, (runner, feed, batch) in runners.items():  # alternating: noise hits every backend alike
            n = len(next(iter(feed.values())))
            scoped = reset_peak_rss() and scoped
            start = time.perf_counter()
            run(runner, feed, batch)
            elapsed = time.perf_counter() - start
            peaks[name] = max(peaks[name], peak_rss_mb())
            latencies[name].append(elapsed * batch / n)  # per batch
            per_repeat[name].append(n / elapsed)
    gemm = gemm_probe.median
    flops, folded = w.flops_per_item(), w.flops_per_item(folded=True)
    base = per_repeat[baseline]
    # GFLOP/s and "of GEMM" count what each backend computes (the eager model: every Rho; the folded graphs: one).
    results = [
        bus_figures(backend_result(runner.name, runner.device, batch, per_repeat[name], base, latencies[name],
                                   peaks[name], folded if computes_folded(runner) else flops, folded, gemm),
                    sum(a[:1].nbytes for a in feed.values()), bus)
        for name, (runner, feed, batch) in runners.items()
    ]  # fmt: skip
    return BenchReport(
        workload={**asdict(w), "flops_definition": "BENCHMARKS.md, per-item layout"},
        machine={**machine_info(), "gemm_library": gemm_probe.library},
        gemm_gflops=gemm,
        flops_per_item=flops,
        flops_per_item_folded=folded,
        bound_items_per_s=gemm * 1e9 / folded,
        repeats=repeats,
        warmup=warmup,
        results=results,
        peak_rss_scope=peak_rss_scope(scoped),
        baseline=runners[baseline][0].name,
        bus_gb_per_s=bus,
    )
