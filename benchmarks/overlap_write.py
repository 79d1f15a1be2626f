"""Writing predictions out while the next batch computes: ``predict``'s writer thread against writing on the main
thread between submits (what it did before), side by side in one run, on a stand-in device.

    python benchmarks/overlap_write.py [--compute-ms 2,4,8] [--genes 5000] [--batch 1024] [--batches 60] [--repeats 5]

On ``ort-cuda`` with CUDA graphs a submit returns only once its batch has computed (onnxruntime synchronizes after a
graph replay). Each batch's predictions (``visium-uni``: 20 KiB a spot, 80 MiB a batch of 4096) must then be written
out while the next batch computes, or the device idles for the write. The stand-in's submit sleeps for the compute
time (the GIL released, as onnxruntime releases it) and the write is the real one (``copy_rows`` into a touched
array); each row prints items/s for both ways and their ratio (median of the repeats, the two alternating).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Device:
    """A blocking submit: returns once the batch has "computed" (a sleep), like a replayed CUDA graph."""

    submit_blocks = True

    def __init__(self, genes: int, compute_s: float):
        from deepspot.runtime.pipeline import HostRing, default_depth

        self.genes, self.compute_s = genes, compute_s
        self.ring = HostRing(default_depth(self, hold=True), lambda shape, dtype: np.empty(shape, dtype))

    def output_specs(self):
        return {"y": ((self.genes,), np.dtype(np.float32))}

    def stage(self, slot):
        return None

    def submit(self, slot):
        time.sleep(self.compute_s)
        slot.result["y"][...] = slot.feed["x"][:, 0, :1]  # each item's first feature, in every gene: checkable
        return None

    def wait(self, handle):
        return None


def _runner(device: _Device):
    from deepspot.runtime.base import TensorSpec

    return types.SimpleNamespace(
        info=types.SimpleNamespace(output_size=device.genes),
        get_input_metadata=lambda: {"x": TensorSpec("x", ("batch", 1, 64), np.dtype(np.float32))},
        pipeline_adapter=lambda batch: (device, None),
    )


def _main_thread_writes(device: _Device, inputs, batch: int, out: np.ndarray) -> None:
    """The consumer as it was: each batch written on the main thread, between two submits."""
    from deepspot.runtime._copy import copy_rows, default_copy_threads
    from deepspot.runtime.pipeline import run_pipeline

    threads = default_copy_threads()
    for start, stop, outputs in run_pipeline(inputs, device, batch, ring=device.ring, copy_threads=threads):
        copy_rows(out[start:stop], outputs["y"], threads)


def measure(compute_ms: float, genes: int = 5000, batch: int = 1024, batches: int = 60, repeats: int = 5) -> dict:
    from deepspot.runtime.stream import predict

    device = _Device(genes, compute_ms / 1e3)
    n = batch * batches
    inputs = {"x": np.random.default_rng(0).standard_normal((n, 1, 64), dtype=np.float32)}
    out = np.zeros((n, genes), np.float32)  # touched: page faults are not timed
    ways = {"main thread": lambda: _main_thread_writes(device, inputs, batch, out),
            "writer thread": lambda: predict(_runner(device), inputs, batch, out=out)}  # fmt: skip
    for run in ways.values():
        run()  # warm-up: the ring's buffers allocated
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):
        for name, run in ways.items():  # alternating
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rates = {k: n / statistics.median(v) for k, v in times.items()}
    return {"compute_ms": compute_ms, "genes": genes, "batch": batch, "items": n,
            "compute_alone_items_per_s": batch / (compute_ms / 1e3),
            "items_per_s": rates, "ratio": rates["writer thread"] / rates["main thread"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-ms", default="2,4,8", help="Compute time per batch of the stand-in, in ms.")
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args(argv)
    rows = [measure(float(c), args.genes, args.batch, args.batches, args.repeats) for c in args.compute_ms.split(",")]
    print("| compute per batch | compute alone, items/s | main thread writes | writer thread | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        rate = r["items_per_s"]
        print(f"| {r['compute_ms']:g} ms | {r['compute_alone_items_per_s']:,.0f} | {rate['main thread']:,.0f} | "
              f"{rate['writer thread']:,.0f} | {r['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
