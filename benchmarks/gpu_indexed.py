"""GPU check of the indexed (whole-slide) layout on the ``torch-cuda`` backend, sized for a short device lease.

    python benchmarks/gpu_indexed.py --out gpu_indexed.json

For ``xenium-slide`` and ``visium-slide`` (seeded random weights at the real sizes):

- parity of the indexed layout on ``torch-cuda`` (fp32 and fp16 compute) against the eager fp32
  model in the per-item layout on the CPU, on a slide of ``--parity-items`` items;
- throughput on the GPU, side by side in one process: the eager model in the per-item layout on ``torch-cuda``
  (one batch of the slide's items, neighbour bags gathered), against both passes of the indexed layout over the
  whole slide.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_indexed.json"))
    parser.add_argument("--parity-items", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slide-items", type=int, default=None, help="default: the workload's")
    args = parser.parse_args()

    import numpy as np
    import torch

    from deepspot.data import synth_slide
    from deepspot.runtime.bench import get_workload
    from deepspot.runtime.indexed import dense_from_index, pipeline_from_model, predict_indexed
    from deepspot.runtime.parity import check_parity_indexed
    from deepspot.runtime.stream import batches
    from deepspot.runtime.torch_runner import TorchRunner
    from deepspot.runtime.backends import RunnerOptions

    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "workloads": {}}
    for name in ("xenium-slide", "visium-slide"):
        w = get_workload(name)
        model = w.build_model(0)
        entry = {"parity": {}, "throughput": {}}
        for precision in ("fp32", "fp16"):
            t0 = time.perf_counter()
            report = check_parity_indexed(
                model,
                model,
                "torch-cuda",
                n_random=args.parity_items,
                options=RunnerOptions(precision=precision),
                batch_size=w.batch_gpu,
            )
            out = report.outputs[0]
            entry["parity"][precision] = {
                "max_abs": out.max_abs,
                "limit": out.limit,
                "min_pearson": out.min_pearson,
                "passed": report.passed,
                "seconds": time.perf_counter() - t0,
            }
            print(name, precision, entry["parity"][precision], flush=True)
        n = args.slide_items or w.n_items
        k = w.bags["neighbors"]
        slide = synth_slide(w.family, n, w.input_size, k, seed=0, n_subspots=w.bags.get("subspot", 9))
        inputs, gather = dense_from_index(slide, model.mode)
        _, _, feed = next(batches(inputs, w.batch_gpu, {k_: v.dtype for k_, v in inputs.items()}, prepare=gather))
        eager = TorchRunner(model, device="cuda").activate()
        pipes = {p: pipeline_from_model(model, "cuda", p, table_dtype=p) for p in ("fp32", "fp16")}
        for p in pipes.values():
            p.__enter__()
        eager.infer(feed)
        for p in pipes.values():
            predict_indexed(p, slide, w.batch_gpu)
        rates = {"eager-per-item-fp32": [], **{f"indexed-{p}": [] for p in pipes}}
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eager.infer(feed, check_inputs=False)
            rates["eager-per-item-fp32"].append(len(feed["neighbors"]) / (time.perf_counter() - t0))
            for p, pipe in pipes.items():
                t0 = time.perf_counter()
                predict_indexed(pipe, slide, w.batch_gpu)
                rates[f"indexed-{p}"].append(n / (time.perf_counter() - t0))
        base = np.array(rates["eager-per-item-fp32"])
        entry["throughput"] = {
            key: {"items_per_s": float(np.median(v)), "ratio_to_eager": float(np.median(np.array(v) / base))}
            for key, v in rates.items()
        }
        entry["n_items"] = n
        print(name, json.dumps(entry["throughput"]), flush=True)
        results["workloads"][name] = entry
        eager.deactivate()
        for p in pipes.values():
            p.__exit__(None, None, None)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
