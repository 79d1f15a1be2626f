"""Time to export the ``visium-uni`` workload (../shared/BENCHMARKS.md) to a validated ONNX file.

D=1024, H=512, E=10, G=5000, spot/subspot_neighbors, seeded random weights. Each repeat is a full
:func:`deepspot.export.export_onnx` (build, trace, check, write, validate on onnxruntime CPU) into a fresh folder;
the median over repeats is reported, each repeat's steps, and the parity report of the median run.

    python benchmarks/export_time.py [--repeats 3] [--no-validate] [--precision fp32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from deepspot import create_model
from deepspot.export import export_onnx

WORKLOAD = dict(
    family="spot",
    mode="subspot_neighbors",
    input_size=1024,
    output_size=5000,
    phi2rho_size=512,
    n_ensemble=10,
    random_seed=0,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--no-validate", action="store_true")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = create_model(**WORKLOAD).eval()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeats):
            result = export_onnx(
                model, Path(folder) / f"visium-uni-{i}.onnx", precision=args.precision, validate=not args.no_validate
            )
            runs.append(result)
            steps = ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items() if k != "total")
            print(f"repeat {i}: {result.seconds['total']:.2f} s ({steps})")
    median_run = sorted(runs, key=lambda r: r.seconds["total"])[len(runs) // 2]
    print(median_run.summary())
    if median_run.validation is not None:
        print(median_run.validation.table())
    print(f"visium-uni export ({args.precision}): {statistics.median(r.seconds['total'] for r in runs):.2f} s")


if __name__ == "__main__":
    main()
