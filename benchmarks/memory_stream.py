"""Peak memory of streaming inference against the number of items (BENCHMARKS.md, "Memory").

For each factor (default 10 and 100 times the batch size) it writes a bundle of seeded random features at the
workload's real sizes, then runs ``deepspot.runtime.infer`` on it in a fresh Python process and reads that process's
peak resident set (``VmHWM``). Streaming keeps the peak flat: it should not grow with the number of items even
though the bundle and the predictions grow a hundredfold.

    python benchmarks/memory_stream.py --workload visium-uni --backend ort-cpu --batch-size 256 --json memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, {repo!r})
    from deepspot.runtime import infer
    start = time.perf_counter()
    result = infer({model!r}, {bundle!r}, {output!r}, {backend!r}, batch_size={batch})
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({{"peak_rss_mb": hwm / 1024, "seconds": time.perf_counter() - start,
                      "items_per_s": result.items_per_s, "n": result.n}}))
    """
)


def write_bundle(folder: Path, workload, n: int, seed: int = 0, chunk: int = 1024) -> Path:
    """A ``.npy``-directory bundle of ``n`` items, written chunk by chunk so that writing it needs little memory."""
    from deepspot.modes import get_mode

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for bag in get_mode(workload.family, workload.mode).bags:
        tiles = 1 if bag.single else workload.bags[bag.name]
        out = np.lib.format.open_memmap(folder / f"{bag.name}.npy", "w+", np.float32, (n, tiles, workload.input_size))
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            out[start : start + rows] = rng.standard_normal((rows, tiles, workload.input_size), dtype=np.float32)
        out.flush()
        del out
    np.save(folder / "barcode.npy", np.array([f"item_{i}" for i in range(n)]))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="visium-uni")
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the workload's CPU batch")
    parser.add_argument("--factors", default="10,100", help="bundle sizes, in batches")
    parser.add_argument("--output", default=".npy", choices=(".npy", ".npz"), help="prediction file type")
    parser.add_argument("--workdir", type=Path, default=None, help="where bundles go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from deepspot import checkpoint
    from deepspot.export import export_onnx
    from deepspot.runtime.bench import get_workload

    w = get_workload(args.workload)
    batch = args.batch_size or w.batch_cpu
    rows = []
    with tempfile.TemporaryDirectory(prefix="deepspot-memory-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = w.build_model(0)
        source = tmp / ("model.onnx" if args.backend != "torch" else "model.safetensors")
        export_onnx(model, source, validate=False) if args.backend != "torch" else checkpoint.save(model, source)
        del model
        for factor in (int(f) for f in args.factors.split(",")):
            n = factor * batch
            bundle = write_bundle(tmp / f"bundle-{factor}", w, n)
            output = tmp / f"pred-{factor}{args.output}"
            code = CHILD.format(
                repo=str(REPO),
                model=str(source),
                bundle=str(bundle),
                output=str(output),
                backend=args.backend,
                batch=batch,
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update(
                factor=factor,
                bundle_mb=sum(f.stat().st_size for f in bundle.iterdir()) / 2**20,
                output_mb=output.stat().st_size / 2**20,
            )
            rows.append(row)
            print(
                f"{factor:>4}x batch ({n:>7,} items): peak RSS {row['peak_rss_mb']:8.0f} MiB | bundle "
                f"{row['bundle_mb']:8.0f} MiB, predictions {row['output_mb']:7.0f} MiB | "
                f"{row['items_per_s']:,.0f} items/s",
                flush=True,
            )
            for f in bundle.iterdir():  # free the disk before the next, larger bundle
                f.unlink()
            output.unlink()
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS at {rows[-1]['factor']}x / at {rows[0]['factor']}x: {growth:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"workload": w.name, "backend": args.backend, "batch_size": batch, "rows": rows, "growth": growth},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
