"""Whole-slide benchmarks (``visium-slide``, ``xenium-slide``): the indexed layout against the eager per-item model.

The baseline is what users run today: the eager PyTorch model in the per-item layout, every item carrying copies of
its neighbours' tiles, on the CPU, or on the GPU (at the workload's GPU batch) when the indexed backends run there.
Its throughput does not depend on the slide's size, so it is timed on the slide's first items (their neighbour bags
gathered from the index): one batch on the CPU; on a GPU, several batches streamed through the overlapping pipeline,
as ``deepspot infer`` runs them and as the per-item benchmark times eager PyTorch on a GPU. Each indexed backend runs
both passes over the whole slide per repeat. Runs alternate, baseline first, and the ratio is the median of the paired per-repeat ratios, as
``BENCHMARKS.md`` asks.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .indexed import table_phrase
from .bench_common import (
    GPU_STREAM_BATCHES,
    BenchReport,
    Gemm,
    Workload,
    backend_result,
    bus_bandwidth,
    bus_figures,
    machine_info,
    peak_rss_mb,
    peak_rss_scope,
    reset_peak_rss,
)


def indexed_flops_per_item(w: Workload) -> float:
    """Phi on the item's own tile and its sub-spots (neighbours are gathered), plus one folded Rho."""
    tiles = 1 + w.bags.get("subspot", 0)
    return float(tiles * w.n_ensemble * w.input_size * w.phi2rho_size * 2 + w.multiplier * w.phi2rho_size *
                 w.output_size * 2)  # fmt: skip


def baseline_device(on_gpu: bool, torch_cuda: bool) -> str:
    """Where the eager baseline runs: on the GPU when the indexed backends do and PyTorch sees it, else on the CPU
    (the baseline's row and the report's ``baseline`` name the device, so a CPU baseline is not read as the GPU's)."""
    return "cuda" if on_gpu and torch_cuda else "cpu"


def run_slide_bench(
    w: Workload,
    backends,
    batch_size: int | None,
    repeats: int,
    warmup: int,
    seed: int = 0,
    options: Any = None,
    allow_fallback: bool = False,
    model: Any = None,
    workdir: str | Path | None = None,
    n_items: int | None = None,
    cli: bool = False,
) -> BenchReport:
    """Benchmark the indexed layout on a synthetic slide; see the module doc. Backends: ``torch`` (the exporter's
    encoder and head modules) and the ONNX backends (an indexed export).

    With ``cli``, each ONNX backend also runs end to end as a user runs it: ``deepspot infer`` on the indexed export
    and the slide saved as a bundle, in a subprocess, timed from its start (interpreter, imports, sessions, input
    checks) to its exit (the predictions written), in the same repeats as the in-process runs."""
    import torch

    from ..data import synth_slide
    from ..export.indexed import export_indexed
    from .backends import BACKENDS, RunnerOptions, get_backend
    from .indexed import dense_from_index, pipeline_from_folder, pipeline_from_model, predict_indexed
    from .ort import physical_cores
    from .stream import batches, predict
    from .torch_runner import TorchRunner

    n = w.n_items if n_items is None else n_items
    if n is None or n < 2:
        raise ConfigError(f"a whole-slide benchmark needs at least 2 items, got {n}")
    names = list(dict.fromkeys(backends))
    for name in names:
        get_backend(name)
    torch.set_num_threads(physical_cores())
    model = model if model is not None else w.build_model(seed)
    k = w.bags["neighbors"]
    slide = synth_slide(w.family, n, w.input_size, k, seed=seed, n_subspots=w.bags.get("subspot", 9))
    # The per-item baseline keeps its workload batch. The indexed passes carry little per item (one tile, K gathered
    # embeddings), so they default to at least 256 items: a 64-row product runs at half the machine's GEMM rate. On a
    # GPU they take the workload's GPU batch, as deepspot infer does there.
    on_gpu = any(get_backend(name).device == "cuda" for name in names)
    batch = batch_size or (w.batch_gpu if on_gpu else max(w.batch_cpu, 256))

    # The baseline's batch: the slide's first items, with their neighbour bags gathered as the per-item layout has.
    # GPU figures are set beside eager PyTorch on the same GPU (BENCHMARKS.md), at the workload's GPU batch.
    inputs, gather = dense_from_index(slide, model.mode)
    base_device = baseline_device(on_gpu, torch.cuda.is_available())
    dense_batch = min(batch_size or (w.batch_gpu if base_device == "cuda" else w.batch_cpu), n)
    # On a GPU the baseline streams several batches through the overlapping pipeline (copies under compute), as the
    # per-item benchmark times it there; one batch copied, then computed, would understate it and inflate the ratio.
    dense_items = min(n, dense_batch * (GPU_STREAM_BATCHES if base_device == "cuda" else 1))
    _, _, dense_feed = next(batches(inputs, dense_items, {k_: v.dtype for k_, v in inputs.items()}, prepare=gather))
    base_name = f"{'torch-cuda' if base_device == 'cuda' else 'torch'} (eager, per-item)"
    baseline = TorchRunner(model, device=base_device, name=base_name).activate()

    def run_baseline(check: bool = False) -> None:
        if base_device == "cuda":
            predict(baseline, dense_feed, dense_batch)
        else:
            baseline.infer(dense_feed, check_inputs=check)

    pipelines: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="deepspot-slide-bench-", dir=workdir) as tmp:
        try:
            for name in names:
                if BACKENDS[name].runs == "model":
                    device = "cuda" if BACKENDS[name].device == "cuda" else "cpu"
                    pipelines[name] = pipeline_from_model(model, device)
                else:
                    folder = Path(tmp) / f"indexed-{name}"
                    if not folder.exists():
                        export_indexed(model, folder, validate=False)
                    o = replace(options or RunnerOptions(), batch_size=batch, bag_sizes={"neighbors": k})
                    pipelines[name] = pipeline_from_folder(folder, name, o, allow_fallback)
                pipelines[name].__enter__()
            cli_runs: dict[str, list[str]] = {}
            if cli:
                from ..data import save_bundle

                bundle = save_bundle(Path(tmp) / "slide", slide)
                for name in names:
                    if BACKENDS[name].runs != "model":
                        cli_runs[name] = cli_command(Path(tmp) / f"indexed-{name}", bundle, Path(tmp) / "cli.npy",
                                                     name, batch, getattr(options, "threads", None))  # fmt: skip
            warm = {key: v[: min(n, 2 * batch)] for key, v in slide.items() if key != "neighbor_index"}
            warm["neighbor_index"] = np.minimum(slide["neighbor_index"][: min(n, 2 * batch)], min(n, 2 * batch) - 1)
            for i in range(warmup):
                run_baseline(check=i == 0)
                for p in pipelines.values():
                    predict_indexed(p, warm, batch)
            per_repeat: dict[str, list[float]] = {"baseline": [], **{name: [] for name in names}}
            per_repeat.update({f"cli:{name}": [] for name in cli_runs})
            latency: dict[str, list[float]] = {key: [] for key in per_repeat}
            peaks = {key: 0.0 for key in per_repeat}
            phases: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}
            locations: dict[str, str] = {}
            gemm = Gemm()
            scoped = True
            for _ in range(repeats):
                gemm.time_once()
                scoped = reset_peak_rss() and scoped
                t0 = time.perf_counter()
                run_baseline()
                elapsed = time.perf_counter() - t0
                per_repeat["baseline"].append(dense_items / elapsed)
                latency["baseline"].append(elapsed * dense_batch / dense_items)  # per batch
                peaks["baseline"] = max(peaks["baseline"], peak_rss_mb())
                for name, p in pipelines.items():
                    scoped = reset_peak_rss() and scoped
                    t0 = time.perf_counter()
                    phases[name].append({})
                    _, locations[name] = predict_indexed(p, slide, batch, timings=phases[name][-1])
                    elapsed = time.perf_counter() - t0
                    per_repeat[name].append(n / elapsed)
                    latency[name].append(elapsed)
                    peaks[name] = max(peaks[name], peak_rss_mb())
                for name, command in cli_runs.items():
                    elapsed = run_cli(command)
                    per_repeat[f"cli:{name}"].append(n / elapsed)
                    latency[f"cli:{name}"].append(elapsed)
                    # The children's high-water mark: not reset between runs, so the largest CLI run's.
                    peaks[f"cli:{name}"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        finally:
            baseline.deactivate()
            for p in pipelines.values():
                p.__exit__(None, None, None)

    rate = gemm.median
    bus = None
    gpu_devices = [p.head.device for p in pipelines.values() if str(p.head.device).startswith("cuda")]
    if gpu_devices:  # what feeds the GPU backends: the host-to-device bus, measured in the same run
        bus = bus_bandwidth(int(str(gpu_devices[0]).partition(":")[2] or 0))
    # Bytes per item that cross the bus in the indexed layout: the item's own tile and sub-spots (fp32) and its
    # neighbour indices (int64); its neighbours' features do not (they are gathered from the table on the device).
    own_tiles = 1 + w.bags.get("subspot", 0)
    bus_bytes = own_tiles * w.input_size * 4 + 8 * k
    dense_flops, folded = w.flops_per_item(), w.flops_per_item(folded=True)
    indexed_flops = indexed_flops_per_item(w)
    base = per_repeat["baseline"]
    results = [backend_result(base_name, base_device, dense_batch, per_repeat["baseline"], base,
                              latency["baseline"], peaks["baseline"], dense_flops, folded, rate)]  # fmt: skip
    bus_figures(results[0], w.tiles * w.input_size * 4, bus)  # the per-item layout: every tile crosses the bus
    for name, p in pipelines.items():
        r = backend_result(f"{p.backend} (indexed, table {table_phrase(locations[name])})", p.head.device, batch, per_repeat[name], base,
                    latency[name], peaks[name], indexed_flops, indexed_flops, rate)  # fmt: skip
        r.phases_s = {phase: float(np.median([t[phase] for t in phases[name]])) for phase in phases[name][0]}
        results.append(bus_figures(r, bus_bytes, bus))
        if name in cli_runs:
            key = f"cli:{name}"
            cli_row = backend_result(f"{p.backend} (CLI: deepspot infer, start-up included)", p.head.device, batch,
                                     per_repeat[key], base, latency[key], peaks[key], indexed_flops, indexed_flops,
                                     rate)  # fmt: skip
            results.append(bus_figures(cli_row, bus_bytes, bus))
    return BenchReport(
        workload={**asdict(w), "n_items": n, "flops_definition": "per-item: BENCHMARKS.md; indexed: own tile and "
                  "sub-spots through Phi, one folded Rho", "latency": "per-item: one batch; indexed: whole slide"},
        machine={**machine_info(), "gemm_library": gemm.library},
        gemm_gflops=rate,
        flops_per_item=dense_flops,
        flops_per_item_folded=indexed_flops,
        bound_items_per_s=rate * 1e9 / indexed_flops,
        repeats=repeats,
        warmup=warmup,
        results=results,
        peak_rss_scope=peak_rss_scope(scoped),
        baseline=base_name,
        bus_gb_per_s=bus,
    )  # fmt: skip


def cli_command(model: Path, bundle: Path, output: Path, backend: str, batch: int, threads: int | None) -> list[str]:
    """``deepspot infer`` as a user types it, run by this interpreter (what the ``deepspot`` script does)."""
    command = [sys.executable, "-c", "from deepspot.cli import main; main()", "infer", str(model), "-i", str(bundle),
               "-o", str(output), "--backend", backend, "--batch-size", str(batch), "--no-progress"]  # fmt: skip
    return command + (["--threads", str(threads)] if threads else [])


def run_cli(command: list[str]) -> float:
    """Seconds from starting ``command`` to its exit; its output is shown only if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark's CLI run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return elapsed
