"""GPU checks that fit in a short device lease: torch on CUDA at fp32/fp16/bf16 (parity at real sizes, throughput).

Run from the repository root on a machine with an NVIDIA GPU:

    python benchmarks/gpu_checks.py --out gpu_checks.json

It measures, for the ``visium-uni`` workload with seeded random weights:

- parity of ``torch-cuda`` at each precision against the eager fp32 model on the CPU (512 random spots);
- ``deepspot bench`` throughput of ``torch-cuda`` at each precision, as written (``eager``) and as exported (fused
  Phi, folded Rho; also under ``torch.compile``), side by side with eager PyTorch on the same GPU (``deepspot bench``'s
  baseline when a GPU backend runs and PyTorch sees the GPU);
- which GPU backends of this package can run on the machine (onnxruntime providers, TensorRT).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_checks.json"))
    parser.add_argument("--workload", default="visium-uni")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parity-items", type=int, default=512)
    args = parser.parse_args()

    import torch

    from deepspot import checkpoint
    from deepspot.runtime import Probe, RunnerOptions, check_parity
    from deepspot.runtime.backends import BACKENDS, unavailable_reason
    from deepspot.runtime.bench import get_workload, run_bench

    probe = Probe.detect()
    results: dict = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "backends": {name: unavailable_reason(name, probe) or "available" for name in BACKENDS},
        "parity": {},
        "bench": {},
    }
    print(json.dumps(results["backends"], indent=1), flush=True)
    w = get_workload(args.workload)
    model = w.build_model(0)
    tmp = tempfile.mkdtemp()
    ckpt_path = checkpoint.save(model, Path(tmp) / "model.safetensors")
    for precision in ("fp32", "fp16", "bf16"):
        start = time.perf_counter()
        report = check_parity(
            ckpt_path, ckpt_path, "torch-cuda", n_random=args.parity_items, options=RunnerOptions(precision=precision)
        )
        results["parity"][f"{precision}-eager"] = {**report.to_dict(), "seconds": time.perf_counter() - start}
        print(report.summary(), flush=True)
    variants = [(p, "eager", False) for p in ("fp32", "fp16", "bf16")]
    variants += [(p, "export", False) for p in ("fp32", "fp16", "bf16")] + [("fp16", "export", True)]
    for precision, graph, compile in variants:
        key = f"{precision}-{graph}" + ("-compiled" if compile else "")
        options = RunnerOptions(precision=precision, torch_graph=graph, compile=compile)
        if graph == "export" and key not in results["parity"]:
            report = check_parity(ckpt_path, ckpt_path, "torch-cuda", n_random=args.parity_items, options=options)
            results["parity"][key] = report.to_dict()
            print(key, report.summary(), flush=True)
        torch.cuda.reset_peak_memory_stats()
        report = run_bench(w, ["torch-cuda"], repeats=args.repeats, warmup=2, model=model, options=options)
        results["bench"][key] = report.to_dict()
        results["bench"][key]["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        for r in report.results:
            print(
                f"{key:<22} {r.backend:<10} batch {r.batch_size:>5} {r.items_per_s:>10,.0f} items/s "
                f"x{r.ratio_to_torch:.1f} p50 {r.p50_ms:.1f} ms p95 {r.p95_ms:.1f} ms",
                flush=True,
            )
        args.out.write_text(json.dumps(results, indent=1, default=str))  # partial results survive a time limit
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
