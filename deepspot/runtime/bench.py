"""``deepspot bench``: the workloads of BENCHMARKS.md, every backend side by side with the eager PyTorch model.

Machines here are shared and noisy, so the figure that counts is the ratio to eager PyTorch measured in the same
process, on the same inputs, with the backends' timed runs alternating; absolute items/s are kept for the record.
Each backend gets warm-up runs, then ``repeats`` timed repeats; throughput is the median over repeats, latency the
p50 and p95 over every timed batch. The machine's own fp32 GEMM rate is measured in the same run, and the fraction
of it achieved is reported with the FLOPs per item as BENCHMARKS.md defines them.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_path


@dataclass(frozen=True)
class Workload:
    """One benchmark workload (a row of BENCHMARKS.md).

    Attributes:
        name: Workload name.
        family: ``spot`` or ``cell``.
        mode: Forward mode.
        input_size: Features per tile ``D``.
        phi2rho_size: Phi width ``H``.
        n_ensemble: Ensemble size ``E``.
        output_size: Genes ``G``.
        bags: Tiles per multi-tile bag (``{"subspot": 9, "neighbors": 6}``).
        batch_cpu: Batch size on the CPU.
        batch_gpu: Batch size on a GPU.
        layout: ``dense`` (per-item bags) or ``indexed`` (whole slide, neighbours by index).
        n_items: Items of a whole-slide workload.
        agg_neighbors: Neighbour pooling of the cell family.
    """

    name: str
    family: str
    mode: str
    input_size: int
    phi2rho_size: int
    n_ensemble: int
    output_size: int
    bags: dict[str, int]
    batch_cpu: int
    batch_gpu: int
    layout: str = "dense"
    n_items: int | None = None
    agg_neighbors: str = "max"

    @property
    def tiles(self) -> int:
        """Tiles per item in the per-item layout: own tile, sub-spots, neighbours."""
        return 1 + sum(self.bags.values())

    @property
    def multiplier(self) -> int:
        from ..modes import get_mode

        return get_mode(self.family, self.mode).multiplier

    def flops_per_item(self, folded: bool = False) -> float:
        """Phi ``tiles x E x D x H x 2`` plus Rho ``E x m*H x G x 2`` (``folded``: one Rho, ``m*H x G x 2``)."""
        phi = self.tiles * self.n_ensemble * self.input_size * self.phi2rho_size * 2
        rho = (1 if folded else self.n_ensemble) * self.multiplier * self.phi2rho_size * self.output_size * 2
        return float(phi + rho)

    def build_model(self, seed: int = 0):
        """The model with seeded random weights at this workload's sizes."""
        from ..factory import create_model

        extra = {"agg_neighbors": self.agg_neighbors} if self.family == "cell" else {}
        return create_model(
            self.family,
            self.mode,
            input_size=self.input_size,
            output_size=self.output_size,
            phi2rho_size=self.phi2rho_size,
            n_ensemble=self.n_ensemble,
            random_seed=seed,
            **extra,
        ).eval()

    def inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded standard-normal inputs for one batch."""
        from ..modes import get_mode

        rng = np.random.default_rng(seed)
        return {
            bag.name: rng.standard_normal(
                (batch, 1 if bag.single else self.bags[bag.name], self.input_size), dtype=np.float32
            )
            for bag in get_mode(self.family, self.mode).bags
        }

    def quick(self) -> "Workload":
        """The same structure at toy sizes, for tests and smoke runs."""
        return replace(
            self,
            name=f"{self.name} (quick)",
            n_items=None if self.n_items is None else 2000,
            input_size=64,
            phi2rho_size=32,
            output_size=50,
            batch_cpu=32,
            batch_gpu=64,
        )


_SPOT = dict(
    family="spot",
    mode="subspot_neighbors",
    phi2rho_size=512,
    n_ensemble=10,
    output_size=5000,
    bags={"subspot": 9, "neighbors": 6},
    batch_cpu=256,
    batch_gpu=4096,
)
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("visium-uni", input_size=1024, **_SPOT),
        Workload("visium-hoptimus", input_size=1536, **_SPOT),
        Workload("xenium", "cell", "neighbors", 1536, 1024, 10, 500, {"neighbors": 44}, 64, 1024),
        Workload("visium-slide", input_size=1024, layout="indexed", n_items=20_000, **_SPOT),
        Workload(
            "xenium-slide",
            "cell",
            "neighbors",
            1536,
            1024,
            10,
            500,
            {"neighbors": 44},
            64,
            1024,
            layout="indexed",
            n_items=100_000,
        ),
    )
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}; expected one of: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


# -- measurements -------------------------------------------------------------------------------------------------
class Gemm:
    """The machine's fp32 matrix-product rate: timed ``(m x k) @ (k x n)`` products with PyTorch (its BLAS)."""

    def __init__(self, m: int = 4096, k: int = 1024, n: int = 5120):
        import torch

        gen = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        self.out = torch.matmul(self.a, self.b)  # warm-up: thread pool, page faults of the output
        self.flops = 2.0 * m * k * n
        self.gflops: list[float] = []

    def time_once(self) -> float:
        """One timed product; its rate in GFLOP/s is recorded and returned."""
        import torch

        start = time.perf_counter()
        torch.matmul(self.a, self.b, out=self.out)
        self.gflops.append(self.flops / (time.perf_counter() - start) / 1e9)
        return self.gflops[-1]

    @property
    def median(self) -> float:
        return float(np.median(self.gflops))


def gemm_rate(repeats: int = 5) -> float:
    """The machine's fp32 GEMM rate in GFLOP/s (4096x1024 by 1024x5120), median of ``repeats`` products."""
    gemm = Gemm()
    for _ in range(repeats):
        gemm.time_once()
    return gemm.median


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux ``clear_refs``); ``False`` if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The resident-set high-water mark in MiB: ``VmHWM`` since the last reset, else the process's ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class BackendResult:
    """One backend's figures in a benchmark run (``status`` says why a backend has none)."""

    backend: str
    status: str = "ok"
    device: str = "cpu"
    batch_size: int = 0
    items_per_s: float = 0.0
    ratio_to_torch: float | None = None
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    peak_rss_mb: float = 0.0
    gflops: float = 0.0
    fraction_of_gemm: float = 0.0
    fraction_of_bound: float = 0.0
    repeats_items_per_s: list[float] = field(default_factory=list)
    flops_per_item: float = 0.0  # what this backend computes: the eager model's unfolded graph or the folded one


@dataclass
class BenchReport:
    """A whole benchmark run."""

    workload: dict[str, Any]
    machine: dict[str, Any]
    gemm_gflops: float
    flops_per_item: float
    flops_per_item_folded: float
    bound_items_per_s: float
    repeats: int
    warmup: int
    results: list[BackendResult]
    peak_rss_scope: str = "per backend (VmHWM reset before each timed run)"

    def result(self, backend: str) -> BackendResult:
        return next(r for r in self.results if r.backend == backend)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, library versions and GPU, for the record."""
    import platform

    import torch

    from .ort import physical_cores

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "physical_cores": physical_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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
        backends: Backends to measure; ``torch`` (the eager model on the CPU, the baseline) is always added.
        batch_size: Items per batch; default the workload's CPU or GPU batch, per backend.
        repeats: Timed repeats per backend (the median is reported; BENCHMARKS.md asks for at least 5).
        warmup: Untimed runs per backend first.
        quick: Shrink the workload to toy sizes (same structure), for tests and smoke runs.
        seed: Seed of the random weights and inputs.
        options: :class:`~deepspot.runtime.backends.RunnerOptions` (device, precision, threads).
        allow_fallback: Permit another backend when one cannot run here.
        model: Benchmark this model instead of the workload's random weights (its sizes must match).
        workdir: Where the temporary ONNX export goes (default: the system's temporary folder).
        n_items: Whole-slide workloads: items on the slide (default: the workload's; quick: 2,000).
        cli: Whole-slide workloads: also time ``deepspot infer`` end to end in a subprocess, start-up included, for
            each ONNX backend (a row beside the in-process one).
    """
    import torch

    from ..export import export_onnx
    from .backends import BACKENDS, RunnerOptions, get_backend, load_runner
    from .ort import physical_cores
    from .torch_runner import TorchRunner

    w = get_workload(workload) if isinstance(workload, str) else workload
    w = w.quick() if quick else w
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if w.layout == "indexed":
        from .slide_bench import run_slide_bench

        return run_slide_bench(w, backends, batch_size, repeats, warmup, seed, options, allow_fallback, model,
                               workdir, n_items=n_items, cli=cli)  # fmt: skip
    if cli:
        raise ConfigError("--cli times `deepspot infer` on a whole slide: use it with visium-slide or xenium-slide")
    names = ["torch"] + [b for b in dict.fromkeys(backends) if b != "torch"]
    for name in names:
        get_backend(name)
    torch.set_num_threads(physical_cores())
    model = model if model is not None else w.build_model(seed)
    runners: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="deepspot-bench-", dir=workdir) as tmp:
        onnx_path = None
        if any(BACKENDS[n].runs == "onnx" for n in names):
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(model, onnx_path, validate=False)
        try:
            for name in names:
                batch = batch_size or (w.batch_gpu if BACKENDS[name].device == "cuda" else w.batch_cpu)
                o = replace(options or RunnerOptions(), batch_size=batch, bag_sizes=dict(w.bags))
                source = model if BACKENDS[name].runs == "model" else onnx_path
                runner = TorchRunner(model) if name == "torch" else load_runner(source, name, o, allow_fallback)
                runners[name] = (runner.activate(), w.inputs(batch, seed))
            return _measure(w, runners, repeats, warmup)
        finally:
            for runner, _ in runners.values():
                runner.deactivate()


def backend_result(
    name: str,
    device: str,
    batch: int,
    items_per_s: list[float],
    baseline_items_per_s: list[float],
    latencies: list[float],
    peak_mb: float,
    flops: float,
    bound_flops: float,
    gemm_gflops: float,
) -> BackendResult:
    """One backend's figures from its per-repeat rates; the ratio is paired: each repeat against the baseline run
    next to it, then the median."""
    ips = float(np.median(items_per_s))
    return BackendResult(
        backend=name,
        device=device,
        batch_size=batch,
        items_per_s=ips,
        ratio_to_torch=float(np.median(np.array(items_per_s) / np.array(baseline_items_per_s))),
        p50_ms=1e3 * float(np.percentile(latencies, 50)),
        p95_ms=1e3 * float(np.percentile(latencies, 95)),
        peak_rss_mb=peak_mb,
        gflops=ips * flops / 1e9,
        fraction_of_gemm=ips * flops / (gemm_gflops * 1e9),
        fraction_of_bound=ips * bound_flops / (gemm_gflops * 1e9),
        repeats_items_per_s=list(items_per_s),
        flops_per_item=flops,
    )


def computes_folded(runner: Any) -> bool:
    """Whether a runner computes the folded graph (one Rho): the ONNX and TensorRT graphs and the torch ``export``
    module do; the eager model runs every Rho of the ensemble."""
    return getattr(runner, "graph", "export") == "export"



def peak_rss_scope(scoped: bool) -> str:
    return (
        "per backend (VmHWM reset before each timed run)"
        if scoped
        else "whole process (ru_maxrss; VmHWM could not be reset)"
    )


def _measure(w: Workload, runners: dict[str, Any], repeats: int, warmup: int) -> BenchReport:
    for runner, feed in runners.values():
        for _ in range(warmup):
            runner.infer(feed)
    per_repeat: dict[str, list[float]] = {name: [] for name in runners}
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, float] = {name: 0.0 for name in runners}
    scoped = True
    gemm_probe = Gemm()
    for _ in range(repeats):
        gemm_probe.time_once()  # the GEMM rate is sampled between the backends' runs, under the same noise
        for name, (runner, feed) in runners.items():  # alternating: noise hits every backend alike
            scoped = reset_peak_rss() and scoped
            start = time.perf_counter()
            runner.infer(feed, check_inputs=False)
            elapsed = time.perf_counter() - start
            peaks[name] = max(peaks[name], peak_rss_mb())
            latencies[name].append(elapsed)
            per_repeat[name].append(len(next(iter(feed.values()))) / elapsed)
    gemm = gemm_probe.median
    flops, folded = w.flops_per_item(), w.flops_per_item(folded=True)
    base = per_repeat["torch"]
    # GFLOP/s and "of GEMM" count what each backend computes (the eager model: every Rho; the folded graphs: one).
    results = [
        backend_result(runner.name, runner.device, len(next(iter(feed.values()))), per_repeat[name], base,
                       latencies[name], peaks[name], folded if computes_folded(runner) else flops, folded, gemm)
        for name, (runner, feed) in runners.items()
    ]  # fmt: skip
    return BenchReport(
        workload={**asdict(w), "flops_definition": "BENCHMARKS.md, per-item layout"},
        machine=machine_info(),
        gemm_gflops=gemm,
        flops_per_item=flops,
        flops_per_item_folded=folded,
        bound_items_per_s=gemm * 1e9 / folded,
        repeats=repeats,
        warmup=warmup,
        results=results,
        peak_rss_scope=peak_rss_scope(scoped),
    )
