"""What both benchmarks share (per-item in :mod:`.bench`, whole-slide in :mod:`.slide_bench`): the workloads of
BENCHMARKS.md, the machine's GEMM rate, peak memory, and the report types. A module of its own, so that the two
benchmarks do not import each other.
"""

from __future__ import annotations

import json
import resource
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


#: Batches a GPU backend (or the eager baseline on a GPU) streams per timed repeat: through the overlapping pipeline,
#: as ``deepspot infer`` runs them (copies of one batch under the compute of another), not one batch copied and
#: computed in turn.
GPU_STREAM_BATCHES = 8


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}; expected one of: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


# -- measurements -------------------------------------------------------------------------------------------------
class Gemm:
    """The machine's fp32 matrix-product rate: timed ``(m x k) @ (k x n)`` products with PyTorch's BLAS, or NumPy's
    where PyTorch is not installed (``library`` says which)."""

    def __init__(self, m: int = 4096, k: int = 1024, n: int = 5120):
        import importlib.util

        self.flops = 2.0 * m * k * n
        self.gflops: list[float] = []
        if importlib.util.find_spec("torch") is not None:
            import torch

            gen = torch.Generator().manual_seed(0)
            self.a, self.b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
            self._matmul, self.library = torch.matmul, f"torch {torch.__version__}"
        else:
            rng = np.random.default_rng(0)
            self.a = rng.standard_normal((m, k), dtype=np.float32)
            self.b = rng.standard_normal((k, n), dtype=np.float32)
            self._matmul, self.library = np.matmul, f"numpy {np.__version__}"
        self.out = self._matmul(self.a, self.b)  # warm-up: thread pool, page faults of the output

    def time_once(self) -> float:
        """One timed product; its rate in GFLOP/s is recorded and returned."""
        start = time.perf_counter()
        self._matmul(self.a, self.b, out=self.out)
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
    fraction_of_gemm: float | None = 0.0
    fraction_of_bound: float | None = 0.0
    repeats_items_per_s: list[float] = field(default_factory=list)
    flops_per_item: float = 0.0  # what this backend computes: the eager model's unfolded graph or the folded one
    phases_s: dict[str, float] = field(default_factory=dict)  # whole slides: median seconds of each pass
    # A GPU backend: the bytes of one item's inputs that cross the bus, and the fraction of the bus-fed limit reached
    # (its "of GEMM" and "of bound" are None there: the CPU's GEMM rate does not bound it).
    input_bytes_per_item: int | None = None
    fraction_of_bus: float | None = None


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
    baseline: str = "torch"
    bus_gb_per_s: dict[str, float] | None = None  # host-to-device, pinned and pageable, when a GPU backend ran

    def result(self, backend: str) -> BackendResult:
        return next(r for r in self.results if r.backend == backend)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)


def bus_bandwidth(device: int = 0, nbytes: int = 256 << 20, repeats: int = 5, cuda: Any = None) -> dict[str, float]:
    """The host-to-device copy rate (GB/s) from page-locked and from pageable memory: the bus that feeds a GPU backend
    (BENCHMARKS.md, "On a GPU: the bus is the limit"). Median of ``repeats`` copies of ``nbytes`` after a warm-up,
    through the CUDA runtime (no PyTorch needed; ``cuda``: a stand-in for tests)."""
    from ._cuda import pinned_array
    from .cuda_libs import CudaRuntime

    cuda = cuda or CudaRuntime(device)
    keep: list = []
    target = cuda.malloc(nbytes)
    try:
        pinned = pinned_array(cuda, (nbytes,), np.uint8, keep)
        pinned.fill(1)
        pageable = np.ones(nbytes, np.uint8)
        out = {}
        for kind, source in (("pinned", pinned), ("pageable", pageable)):
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                cuda.copy(target, source.ctypes.data, nbytes, cuda.H2D)  # returns once the copy has ended
                times.append(time.perf_counter() - start)
            out[f"{kind}_gb_per_s"] = nbytes / float(np.median(times[1:])) / 1e9
        return out
    finally:
        for ptr in keep:
            cuda.free_host(ptr)
        cuda.free(target)


def bus_fraction(items_per_s: float, bytes_per_item: int, gb_per_s: float | None) -> float | None:
    """The fraction of the bus-fed limit (``gb_per_s`` over the input bytes of one item) that ``items_per_s`` is."""
    if not gb_per_s or bytes_per_item <= 0:
        return None
    return items_per_s / (gb_per_s * 1e9 / bytes_per_item)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, library versions and GPU, for the record."""
    import platform

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
        "numpy": np.__version__,
    }
    try:
        import torch
    except ImportError:  # a serving install: the ONNX backends are compared with each other
        torch = None
    if torch is not None:
        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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
    next to it, then the median (``ratio_to_torch`` keeps its name; the report's ``baseline`` says what it is
    relative to: eager PyTorch, or the first backend when ONNX backends are compared without it)."""
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


def on_gpu(result: BackendResult) -> bool:
    return result.device.startswith("cuda")


def bus_figures(result: BackendResult, bytes_per_item: int, bus: dict[str, float] | None) -> BackendResult:
    """Make a GPU backend's row say what bounds it: the fraction of the bus-fed limit (pinned bandwidth over the
    item's input bytes) instead of the fractions of the CPU's GEMM rate."""
    if not on_gpu(result):
        return result
    result.input_bytes_per_item = int(bytes_per_item)
    result.fraction_of_bus = bus_fraction(result.items_per_s, bytes_per_item, (bus or {}).get("pinned_gb_per_s"))
    result.fraction_of_gemm = result.fraction_of_bound = None
    return result


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
