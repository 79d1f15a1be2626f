"""Per-slide overhead of a cohort run: 50 small slides in one process against the same items in one bundle.

    python benchmarks/cohort.py [--slides 50] [--items 200] [--repeats 3]

Both runs use one model and backend (``ort-cpu``, a cell/neighbors model of the ``xenium`` shape at reduced width)
in the same process, alternating, median of the repeats; the overhead per slide is
``(cohort seconds - one-bundle seconds) / slides``. It covers what a slide costs beyond its items: opening and
checking its bundle, the output file, the resume record.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=50)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", default="npz")
    args = parser.parse_args(argv)

    import deepspot
    from deepspot.data import save_bundle, synth_bundle
    from deepspot.export import export_onnx
    from deepspot.runtime import infer
    from deepspot.runtime.cohort import CohortSettings, plan_slides, run_cohort

    root = Path(tempfile.mkdtemp(prefix="deepspot-cohort-bench-"))
    model = deepspot.create_model("cell", "neighbors", input_size=256, output_size=500, phi2rho_size=256)
    export_onnx(model, root / "model.onnx", validate=False)
    slides = []
    parts = []
    for i in range(args.slides):
        data = synth_bundle("cell", "neighbors", args.items, 256, 500, seed=i, n_neighbors=8)
        data.pop("target")
        (root / "in").mkdir(exist_ok=True)
        slides.append(save_bundle(root / "in" / f"slide{i:03d}.npz", data))
        parts.append(data)
    whole = {k: np.concatenate([p[k] for p in parts]) for k in ("cell", "neighbors")}
    one = save_bundle(root / "all.npz", whole)
    settings = CohortSettings(backend="ort-cpu")
    cohort_s, single_s = [], []
    for r in range(args.repeats):
        out = root / f"out{r}"
        t0 = time.perf_counter()
        result = run_cohort(root / "model.onnx", plan_slides(slides, None, out, args.format), out, settings)
        cohort_s.append(time.perf_counter() - t0)
        assert not result.failed, result.failed
        t0 = time.perf_counter()
        infer(root / "model.onnx", one, root / f"all{r}.{args.format}", backend="ort-cpu")
        single_s.append(time.perf_counter() - t0)
    report = {
        "slides": args.slides,
        "items_per_slide": args.items,
        "cohort_seconds": statistics.median(cohort_s),
        "one_bundle_seconds": statistics.median(single_s),
    }
    report["overhead_per_slide_s"] = (report["cohort_seconds"] - report["one_bundle_seconds"]) / args.slides
    print(report)
    shutil.rmtree(root, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
