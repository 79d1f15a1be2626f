"""Peak memory of whole-slide (indexed) inference against the number of items.

For each slide size it writes a seeded synthetic slide in the indexed layout (a directory of ``.npy`` files, so the
features are memory-mapped), then runs ``deepspot.runtime.infer`` on it in a fresh Python process with the embedding
table in memory and memory-mapped, and reads that process's peak resident set (``VmHWM``). With the table in memory
the peak grows by the table's ``N x H`` floats and nothing else; memory-mapped, it stays flat.

    python benchmarks/slide_memory.py --workload xenium-slide --items 10000,40000,100000 --json slide_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {repo!r})
    from deepspot.runtime import infer
    start = time.perf_counter()
    result = infer({model!r}, {bundle!r}, {output!r}, batch_size={batch}, table={table!r})
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({{"peak_rss_mb": hwm / 1024, "seconds": time.perf_counter() - start,
                      "items_per_s": result.items_per_s, "n": result.n, "table": result.table}}))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="xenium-slide")
    parser.add_argument("--items", default="10000,40000")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from deepspot import checkpoint
    from deepspot.data import save_bundle, synth_slide
    from deepspot.runtime.bench import get_workload

    w = get_workload(args.workload)
    batch = args.batch_size or w.batch_cpu
    rows = []
    with tempfile.TemporaryDirectory(prefix="deepspot-slide-memory-") as tmp:
        tmp = Path(tmp)
        model = checkpoint.save(w.build_model(0), tmp / "model.safetensors")
        for n in (int(x) for x in args.items.split(",")):
            slide = synth_slide(w.family, n, w.input_size, w.bags["neighbors"], seed=0,
                                n_subspots=w.bags.get("subspot", 9))  # fmt: skip
            bundle = save_bundle(tmp / f"slide-{n}", {k: v for k, v in slide.items() if not k.endswith("pixel")})
            del slide
            features_mb = sum(f.stat().st_size for f in bundle.iterdir()) / 2**20
            for table in ("memory", "mmap"):
                code = CHILD.format(repo=str(REPO), model=str(model), bundle=str(bundle),
                                    output=str(tmp / "pred.npy"), batch=batch, table=table)  # fmt: skip
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row.update(bundle_mb=features_mb, table_mb=(n + 1) * w.phi2rho_size * 4 / 2**20)
                rows.append(row)
                print(f"N={n:>7,}  table {table:6}  peak RSS {row['peak_rss_mb']:8.0f} MiB  "
                      f"(bundle {features_mb:,.0f} MiB, table {row['table_mb']:,.0f} MiB)  "
                      f"{row['items_per_s']:,.0f} items/s", flush=True)  # fmt: skip
            for f in bundle.iterdir():
                f.unlink()
    if args.json:
        args.json.write_text(json.dumps({"workload": w.name, "batch_size": batch, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
