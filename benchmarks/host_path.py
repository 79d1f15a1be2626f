"""What the GPU pipeline can reach with an infinitely fast model: ``predict``'s host side and the bus, measured with
no compute, side by side in one run.

    python benchmarks/host_path.py [--items 32768] [--batch 4096] [--threads 8,16] [--repeats 5] [--backend B]
                                   [--json FILE]

The GPU suite's ``visium-uni`` rows stay below the bus-fed limit even where the graph alone on the device is faster
than the bus. This script takes the model out and measures the rest of the path, with the workload's real shapes
(``visium-uni``: 16 tiles x 1024 features in, 5000 predictions out per spot), through :func:`predict` itself:

- ``host copies alone``: a stand-in device that does nothing; what is timed is the staging of each batch into the
  ring (the prefetch thread, on ``--threads`` copy threads) and the writing of its predictions into the output array
  (the writer thread): the host's ceiling.
- ``bus, no compute`` (needs PyTorch with CUDA): a device whose "compute" is nothing but the copies: each batch's
  inputs go to the GPU from page-locked slots on a copy stream, and a prediction-sized buffer comes back into the
  slot on another stream, as the ``ort-cuda`` and ``torch-cuda`` adapters do; the pipeline's ceiling on this machine.

- ``<backend>, the model`` (``--backend ort-cuda`` or ``torch-cuda``): the workload's real graph (fp16 arithmetic: an
  fp16 graph that takes fp32 features as they are, or fp16 features), through the same ``predict``, on the same thread
  counts: how close the real rows come to the ceiling above.

Each row gives items/s (median of ``--repeats`` runs, the rows alternating) and its fraction of the bus-fed limit
(page-locked host-to-device bandwidth, measured in the same run, over the input bytes of one item).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/staging_copy.py

from gpu_suite import cuda_available  # noqa: E402
from staging_copy import copy_threads_env  # noqa: E402

from deepspot.runtime.bench_common import bus_bandwidth  # noqa: E402


class _Nothing:
    """A device that does nothing: the batch's predictions are whatever its slot held (the host side alone)."""

    def __init__(self, genes: int):
        from deepspot.runtime.pipeline import HostRing, default_depth

        self.genes = genes
        self.ring = HostRing(default_depth(self, hold=True), lambda shape, dtype: np.zeros(shape, dtype))

    def output_specs(self):
        return {"y": ((self.genes,), np.dtype(np.float32))}

    def submit(self, slot):
        return None

    def wait(self, handle):
        return None


class _CopiesOnly(_Nothing):
    """A CUDA device whose compute is nothing: inputs copied in on a copy stream, a prediction-sized buffer copied out
    on the compute stream after them (page-locked slots, PyTorch's streams and events)."""

    def __init__(self, genes: int, batch: int, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        import torch

        from deepspot.runtime.pipeline import HostRing, default_depth

        self.torch, self.genes = torch, genes
        self.copy_stream, self.compute_stream = torch.cuda.Stream(), torch.cuda.Stream()
        self.device_inputs = {k: torch.empty((batch,) + shape, dtype=_torch_dtype(dtype), device="cuda")
                              for k, (shape, dtype) in specs.items()}  # fmt: skip
        self.device_out = torch.zeros((batch, genes), dtype=torch.float32, device="cuda")
        self.ring = HostRing(default_depth(self, hold=True), self._pinned)

    def _pinned(self, shape, dtype):
        return self.torch.zeros(shape, dtype=_torch_dtype(dtype), pin_memory=True).numpy()

    def submit(self, slot):
        torch = self.torch
        landed = torch.cuda.Event()
        with torch.cuda.stream(self.copy_stream):
            for k, v in slot.feed.items():
                self.device_inputs[k][: len(v)].copy_(torch.from_numpy(v), non_blocking=True)
            landed.record(self.copy_stream)
        done = torch.cuda.Event()
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(landed)
            y = slot.result["y"]
            torch.from_numpy(y).copy_(self.device_out[: len(y)], non_blocking=True)
            done.record(self.compute_stream)
        return done

    def wait(self, handle):
        handle.synchronize()


def _torch_dtype(dtype):
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np.dtype(dtype)]


def _runner(device, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
    from deepspot.runtime.base import TensorSpec

    return types.SimpleNamespace(
        info=types.SimpleNamespace(output_size=device.genes),
        get_input_metadata=lambda: {k: TensorSpec(k, ("batch",) + shape, dtype) for k, (shape, dtype) in specs.items()},
        pipeline_adapter=lambda batch: (device, None),
    )


def _model_runner(w, features: str, backend: str, batch: int, work: Path):
    """The workload's graph with fp16 arithmetic on ``backend``, taking ``features`` (fp32 or fp16) as they are."""
    from deepspot.runtime import RunnerOptions, load_runner

    model = w.build_model(0)
    io = "fp16" if features == "fp16" else None
    if backend == "torch-cuda":
        options = RunnerOptions(torch_graph="export", precision="fp16", io=io, batch_size=batch)
        return load_runner(model, backend, options)
    from deepspot.export import export_onnx

    path = work / f"visium-{features}-features-fp16.onnx"
    export_onnx(model, path, io_dtype=io, precision="fp16", validate=False)
    return load_runner(path, backend, RunnerOptions(cuda_graph=backend == "ort-cuda", batch_size=batch))


def measure(
    items: int = 32768,
    batch: int = 4096,
    threads: tuple[int, ...] = (8, 16),
    repeats: int = 5,
    backend: str | None = None,
    work: Path | None = None,
) -> dict:
    from deepspot.runtime.bench import get_workload
    from deepspot.runtime.stream import predict

    w = get_workload("visium-uni")
    shapes = {k: v.shape[1:] for k, v in w.inputs(1).items()}
    genes = w.output_size
    has_cuda, why = cuda_available()
    no_cuda = None if has_cuda else why
    pinned = bus_bandwidth()["pinned_gb_per_s"] if has_cuda else None
    out = np.zeros((items, genes), np.float32)  # touched: page faults are not timed
    result = {"workload": w.name, "backend": backend, "items": items, "batch": batch, "genes": genes,
              "pinned_gb_per_s": pinned, "bus_no_compute": no_cuda or "measured", "rows": {}}  # fmt: skip
    for features in ("fp32", "fp16"):
        dtype = np.dtype(np.float16 if features == "fp16" else np.float32)
        specs = {k: (s, dtype) for k, s in shapes.items()}
        inputs = {k: np.full((items,) + s, 0.5, dtype) for k, s in shapes.items()}  # every page written
        per_item = sum(a[:1].nbytes for a in inputs.values())
        devices = {"host copies alone": _Nothing(genes)}
        if no_cuda is None:
            devices["bus, no compute"] = _CopiesOnly(genes, batch, specs)
        runners = {name: _runner(device, specs) for name, device in devices.items()}
        if backend is not None:
            runners[f"{backend}, the model"] = _model_runner(w, features, backend, batch, work).activate()
        runs = {}
        for name, runner in runners.items():
            for t in threads:
                runs[f"{name}, {features} features, {t} copy threads"] = (runner, t)
        try:
            for runner, t in runs.values():  # warm-up: rings allocated, pages touched, graphs captured
                with copy_threads_env(t):
                    predict(runner, inputs, batch, out=out)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(repeats):
                for name, (runner, t) in runs.items():  # alternating: drift hits every row alike
                    with copy_threads_env(t):
                        start = time.perf_counter()
                        predict(runner, inputs, batch, out=out)
                        times[name].append(time.perf_counter() - start)
        finally:
            for runner in runners.values():
                if hasattr(runner, "deactivate"):
                    runner.deactivate()
        for name, ts in times.items():
            rate = items / statistics.median(ts)
            result["rows"][name] = {
                "items_per_s": rate,
                "input_bytes_per_item": per_item,
                "output_bytes_per_item": genes * 4,
                "host_gb_per_s": rate * (per_item + genes * 4) / 1e9,  # bytes staged in and written out
                "bus_limit_items_per_s": None if pinned is None else pinned * 1e9 / per_item,
                "fraction_of_limit": None if pinned is None else rate * per_item / (pinned * 1e9),
            }
        del inputs
    return result


def _counts(text: str) -> tuple[int, ...]:
    """``--threads``: comma-separated whole numbers, each at least 1."""
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected thread counts such as 8,12,16, got {text!r}")
    return tuple(int(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=_counts, default=(8, 16), help="Copy threads of the rows, comma-separated.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--backend",
        choices=("ort-cuda", "torch-cuda"),
        default=None,
        help="Also run the workload's graph (fp16 arithmetic) on this backend, on the same threads.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = parser.parse_args(argv)
    threads = args.threads
    with tempfile.TemporaryDirectory(prefix="deepspot-host-path-") as work:
        result = measure(args.items, args.batch, threads, args.repeats, args.backend, Path(work))
    pinned = result["pinned_gb_per_s"]
    print(
        f"visium-uni, {result['items']} items, batch {result['batch']}; page-locked host-to-device: "
        f"{'-' if pinned is None else f'{pinned:.1f} GB/s'}; bus, no compute: {result['bus_no_compute']}"
    )
    print("| row | items/s | host copies, GB/s | fraction of bus limit |")
    print("| --- | --- | --- | --- |")
    for name, r in result["rows"].items():
        frac = r["fraction_of_limit"]
        print(
            f"| {name} | {r['items_per_s']:,.0f} | {r['host_gb_per_s']:.1f} | "
            f"{'-' if frac is None else f'{frac:.0%}'} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
