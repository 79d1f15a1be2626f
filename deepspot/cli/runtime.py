"""``deepspot infer``, ``parity``, ``bench``, ``engine build`` / ``engine info`` and ``quickstart``.

Each command maps its options onto one library call in :mod:`deepspot.runtime` (or :mod:`deepspot.quickstart`) and
prints the result; a user's mistake is one line on stderr and exit code 2, a failed parity check exit code 1.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from ..limits import MAX_BAG
from .core import NO_CLOBBER_HELP, app, fail, handle_errors

engine_app = typer.Typer(
    help="Build and inspect native TensorRT engines (.plan).", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(engine_app, name="engine")

TORCH_GRAPH_HELP = "torch backends: eager (the model as written) or export (fused Phi, folded Rho, as in the ONNX)."
CUDA_GRAPH_HELP = "onnxruntime GPU backends: capture and replay CUDA graphs (default: on for ort-cuda)."
TF32_HELP = ("GPU backends: let fp32 matrix products use TF32 tensor cores (faster, not fp32-exact; checked against "
             "the tf32 tolerance). Off by default.")
BACKEND_HELP = "Backend: torch, torch-cuda, ort-cpu, ort-cuda, ort-trt or tensorrt (default from the model file type)."


@contextlib.contextmanager
def _announce_fallbacks():
    """Print an allowed backend fallback as one clear line instead of a Python warning with a source line."""
    from ..runtime.backends import FallbackWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        yield
    for w in caught:
        if issubclass(w.category, FallbackWarning):
            typer.echo(f"Warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _console():
    """A rich console; 120 columns when the output is not a terminal, so tables are not cut in logs and pipes."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def _options(
    device: int,
    precision: Optional[str],
    threads: Optional[int],
    compile: bool = False,
    cache_dir: Optional[Path] = None,
    torch_graph: str = "eager",
    tf32: bool = False,
    cuda_graph: Optional[bool] = None,
):
    from ..runtime.backends import RunnerOptions

    return RunnerOptions(
        device=device,
        precision=precision,
        threads=threads,
        compile=compile,
        cache_dir=cache_dir,
        torch_graph=torch_graph,
        tf32=tf32,
        cuda_graph=cuda_graph,
    )


def _bag_sizes(text: Optional[str]) -> dict[str, int]:
    from ..errors import ConfigError

    sizes = {}
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        if not value.strip().isdigit():
            raise ConfigError(f"--bag-sizes takes name=size pairs such as subspot=9,neighbors=6; got {part!r}")
        sizes[name.strip()] = int(value)
    return sizes


@app.command()
@handle_errors
def infer(
    model: Path = typer.Argument(
        ..., help="An .onnx file, an indexed export's folder, a TensorRT .plan, or a checkpoint (runs on torch)."
    ),
    more: Optional[List[Path]] = typer.Argument(
        None, metavar="[BUNDLE]...", help="More bundles of a cohort, as in --input A.npz B.npz C.npz (a shell glob)."
    ),
    input: Optional[List[Path]] = typer.Option(
        None, "--input", "-i", help="Feature bundle(s): .npz or a directory of .npy files; several make a cohort."
    ),
    output: Optional[Path] = typer.Option(
        None,
        "--output",
        "-o",
        help="One bundle's predictions: .npy, .npz (with barcodes and genes) or .h5ad; replaced if it exists, never "
        "an input.",
    ),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir", help="Cohort: one output per slide, OUT/<slide>.<format>, and OUT/cohort.json."
    ),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", help="Cohort: a CSV with slide and input columns (optional output)."
    ),
    format: Optional[str] = typer.Option(
        None, "--format", help="Cohort: output format, h5ad (the default), npz or npy."
    ),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="Cohort: I/N (I in 0..N-1), this job's share of the slides."
    ),
    force: bool = typer.Option(False, "--force", help="Cohort: redo slides whose output is up to date."),
    verify: bool = typer.Option(False, "--verify", help="Cohort: compare inputs by SHA-256, not size and mtime."),
    devices: Optional[str] = typer.Option(
        None, "--devices", help="Cohort: one worker process per device, such as 0,1,2,3 (or cpu,cpu)."
    ),
    no_clobber: bool = typer.Option(False, "--no-clobber", help=NO_CLOBBER_HELP),
    backend: Optional[str] = typer.Option(None, help=BACKEND_HELP),
    batch_size: Optional[int] = typer.Option(
        None, help="Items per batch (default 256 on the CPU; on a GPU 4096 spots or 1024 cells)."
    ),
    max_bag: int = typer.Option(MAX_BAG, help="Largest bag (sub-spots or neighbours per item) accepted."),
    device: int = typer.Option(0, help="GPU index for the GPU backends."),
    precision: Optional[str] = typer.Option(
        None, help="fp32, fp16 or bf16 (torch, ort-trt, tensorrt); default: the model's."
    ),
    inverse_transform: bool = typer.Option(
        False, "--inverse-transform", help="Map predictions to the original scale with the model's scaler."
    ),
    allow_fallback: bool = typer.Option(
        False, "--allow-fallback", help="Run on another backend if this one is unavailable (announced)."
    ),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: physical cores)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (torch backends)."),
    torch_graph: str = typer.Option("eager", help=TORCH_GRAPH_HELP),
    tf32: bool = typer.Option(False, "--tf32", help=TF32_HELP),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help=CUDA_GRAPH_HELP),
    cache_dir: Optional[Path] = typer.Option(None, help="TensorRT engine and timing cache folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with items/s."),
    layout: Optional[str] = typer.Option(
        None,
        help="dense or indexed; default: indexed when the bundle has neighbor_index or MODEL is an indexed export.",
    ),
    table: str = typer.Option(
        "auto",
        help="Indexed layout: embedding table in memory, mmap, or on the device the head runs on, gathered from in the "
        "graph (device); auto: device on ort-cuda and torch-cuda, else memory or mmap by size.",
    ),
    table_dtype: str = typer.Option("fp32", help="Indexed layout from a checkpoint: table dtype, fp32 or fp16."),
) -> None:
    """Stream a feature bundle (or a cohort of them) through a model and write the predictions atomically."""
    from ..checks import at_least, check_threads
    from ..errors import ConfigError
    from ..runtime import infer as run_infer

    # Here too, not only in the library: a cohort's workers would fail each slide in turn on an option that is wrong
    # for all of them.
    if batch_size is not None:
        at_least(batch_size, "--batch-size")
    at_least(max_bag, "--max-bag")
    check_threads(threads)
    from ..runtime.infer import check_layout_options

    check_layout_options(None, table, table_dtype)
    bundles = list(input or []) + list(more or [])
    if output_dir is not None or manifest is not None or len(bundles) > 1:
        if output is not None or no_clobber:
            raise ConfigError("a cohort writes one output per slide into --output-dir; -o and --no-clobber are for one bundle")
        if output_dir is None:
            raise ConfigError("a cohort (several bundles or --manifest) needs --output-dir")
        # What a cohort does not take is refused, not ignored.
        single = {"--allow-fallback": allow_fallback, "--compile": compile, "--cache-dir": cache_dir,
                  "--torch-graph": torch_graph != "eager", "--device": device != 0}  # fmt: skip
        given = [name for name, value in single.items() if value]
        if given:
            hint = "; a cohort's workers take --devices" if given[0] == "--device" else ""
            raise ConfigError(f"{given[0]} is for one bundle (-o), not a cohort{hint}")
        from ..runtime.cohort import CohortSettings

        settings = CohortSettings(backend, batch_size, inverse_transform, layout, table, table_dtype, max_bag, precision,
                                  threads, tf32, cuda_graph)  # fmt: skip
        _cohort(model, bundles, manifest, output_dir, format or "h5ad", shard, force, verify, devices, settings)
        return
    if len(bundles) != 1 or output is None:
        raise ConfigError("give one bundle with -i and its output with -o (or several bundles with --output-dir)")
    cohort_only = {"--format": format, "--shard": shard, "--force": force, "--verify": verify, "--devices": devices}
    given = [name for name, value in cohort_only.items() if value]
    if given:
        hint = " (-o's suffix says the format)" if given[0] == "--format" else ""
        raise ConfigError(f"{given[0]} is for a cohort (--output-dir), not one bundle with -o{hint}")
    from ..runtime.infer import check_backend_options

    check_backend_options(model, backend, compile, torch_graph, cache_dir, table_dtype, device)
    with _announce_fallbacks():
        result = run_infer(
            model,
            bundles[0],
            output,
            backend=backend,
            batch_size=batch_size,
            options=_options(device, precision, threads, compile, cache_dir, torch_graph, tf32, cuda_graph),
            inverse_transform=inverse_transform,
            allow_fallback=allow_fallback,
            progress=progress,
            layout=layout,
            table=table,
            table_dtype=table_dtype,
            max_bag=max_bag,
            no_clobber=no_clobber,
        )
    from ..runtime.indexed import table_phrase

    where = f", {result.layout} layout" + (f", table {table_phrase(result.table)}" if result.table else "")
    typer.echo(
        f"wrote {result.output}: {result.n} x {result.genes} predictions on {result.backend}{where} "
        f"in {result.seconds:.2f} s ({result.items_per_s:,.0f} items/s)"
    )


def _cohort(model, bundles, manifest, output_dir, fmt, shard, force, verify, devices, settings) -> None:
    from rich.markup import escape
    from rich.table import Table

    from ..runtime.cohort import parse_shard, plan_slides, run_cohort

    slides = plan_slides(bundles, manifest, output_dir, fmt)
    if fmt == "h5ad":
        from ..anndata_io import _anndata

        _anndata()  # before any work: say now that .h5ad needs anndata (or --format npz)
    console = _console()

    def line(status) -> None:
        what = {"done": "[green]done[/green]", "skipped": "skipped (up to date)", "failed": "[red]failed[/red]"}
        extra = f": {escape(status.error)}" if status.error else f", {status.items:,} items in {status.seconds:.1f} s"
        console.print(f"{status.name}: {what[status.status]}{extra if status.status != 'skipped' else ''}")

    device_list = [d.strip() for d in devices.split(",")] if devices else None
    with _announce_fallbacks():
        result = run_cohort(model, slides, output_dir, settings, parse_shard(shard), force, verify, device_list, line)
    table = Table(title=f"cohort: {len(result.slides)} slides", show_header=True)
    for column in ("slide", "status", "items", "seconds", "output or error"):
        table.add_column(column, overflow="fold")
    for st in result.slides:
        table.add_row(st.name, st.status, f"{st.items:,}", f"{st.seconds:.1f}", escape(st.error or st.output))
    console.print(table)
    counts = result.counts()
    console.print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; wrote {result.record}")
    if result.failed:
        raise typer.Exit(1)


@app.command()
@handle_errors
def parity(
    checkpoint: Path = typer.Argument(
        ...,
        help="The reference checkpoint (.safetensors, or a reference .pkl/.ckpt); with --expected, the model to check.",
    ),
    model: Optional[Path] = typer.Argument(
        None,
        help="What to check: an .onnx file, an indexed export's folder, a .plan, or a checkpoint (torch backends).",
    ),
    expected: Optional[Path] = typer.Option(
        None,
        "--expected",
        help="Compare with stored reference outputs for --input's items (.npy, or an .npz with predictions) instead "
        "of a checkpoint; needs no PyTorch. Then give only the model.",
    ),
    inverse_transform: bool = typer.Option(
        False, "--inverse-transform", help="With --expected: the stored outputs are on the original scale."
    ),
    backend: Optional[str] = typer.Option(None, help=BACKEND_HELP),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Compare on this bundle's items."),
    random: Optional[int] = typer.Option(None, "--random", help="Compare on N seeded random items (default 64)."),
    atol: Optional[float] = typer.Option(None, help="Absolute tolerance (default: the precision's row of the table)."),
    rtol: Optional[float] = typer.Option(
        None, help="Relative tolerance, times max |reference| (default: the table's)."
    ),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the report as JSON here."),
    batch_size: int = typer.Option(256, help="Items per batch."),
    device: int = typer.Option(0, help="GPU index for the GPU backends."),
    precision: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (torch, ort-trt, tensorrt)."),
    allow_fallback: bool = typer.Option(
        False, "--allow-fallback", help="Run on another backend if this one is unavailable."
    ),
    seed: int = typer.Option(0, help="Seed of the random inputs."),
    torch_graph: str = typer.Option("eager", help=TORCH_GRAPH_HELP),
    tf32: bool = typer.Option(False, "--tf32", help=TF32_HELP),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help=CUDA_GRAPH_HELP),
    layout: Optional[str] = typer.Option(
        None, help="dense or indexed (compare the indexed layout with the per-item model); default from MODEL/bundle."
    ),
) -> None:
    """Compare a backend with the eager PyTorch model, or with stored outputs (--expected); exit 1 when it fails."""
    from ..runtime import check_parity, check_parity_expected

    if input is not None and random is not None:
        fail("give either --input or --random, not both")
    if report is not None:
        from ..fileio import check_output_file

        check_output_file(report, "--report", [checkpoint, model, input, expected], ".json")  # before the comparison
    if expected is not None:
        if model is not None:
            fail("with --expected, give only the model to check (the stored outputs are the reference)")
        if input is None:
            fail("--expected needs --input: the bundle the stored outputs were computed on")
        from ..runtime.infer import check_backend_options

        check_backend_options(checkpoint, backend, torch_graph=torch_graph, device=device)
        with _announce_fallbacks():
            result = check_parity_expected(
                checkpoint,
                expected,
                input,
                backend=backend,
                atol=atol,
                rtol=rtol,
                batch_size=batch_size,
                options=_options(device, precision, None, torch_graph=torch_graph, tf32=tf32, cuda_graph=cuda_graph),
                allow_fallback=allow_fallback,
                layout=layout,
                inverse_transform=inverse_transform,
            )
        _finish_parity(result, report)
        return
    if model is None:
        fail("give the reference checkpoint and the model to check (or the model and --expected PRED.npy)")
    if inverse_transform:
        fail("--inverse-transform applies to --expected only")
    from ..runtime.infer import check_backend_options

    check_backend_options(model, backend, torch_graph=torch_graph, device=device)
    with _announce_fallbacks():
        result = check_parity(
            checkpoint,
            model,
            backend=backend,
            bundle=input,
            n_random=random,
            atol=atol,
            rtol=rtol,
            batch_size=batch_size,
            options=_options(device, precision, None, torch_graph=torch_graph, tf32=tf32, cuda_graph=cuda_graph),
            allow_fallback=allow_fallback,
            seed=seed,
            layout=layout,
        )
    _finish_parity(result, report)


def _finish_parity(result, report: Optional[Path]) -> None:
    _print_parity(result)
    if report is not None:
        result.save(report)
        typer.echo(f"wrote {report}")
    if not result.passed:
        raise typer.Exit(1)


def _print_parity(result) -> None:
    from rich.table import Table

    table = Table(title=f"parity: {result.backend} ({result.precision}) vs {result.reference}, {result.n} items")
    columns = ("output", "max abs err", "abs limit", "mean abs err", "max rel err", "min gene r", "r limit", "result")
    for column in columns:
        table.add_column(column, justify="left" if column in ("output", "result") else "right")
    for o in result.outputs:
        r = "n/a" if o.min_pearson is None else f"{o.min_pearson:.6f}"
        verdict = "[green]PASS[/green]" if o.passed else "[red]FAIL[/red]"
        table.add_row(
            o.name,
            f"{o.max_abs:.3g}",
            f"{o.limit:.3g}",
            f"{o.mean_abs:.3g}",
            f"{o.max_rel:.3g}",
            r,
            f"{o.tolerance.min_pearson}",
            verdict,
        )
    console = _console()
    console.print(table)
    console.print("abs limit bounds max abs err (atol + rtol x max |reference|); r limit bounds min gene r")
    for note in result.notes:
        console.print(f"note: {note}")


@app.command()
@handle_errors
def bench(
    workload: str = typer.Option(
        "visium-uni",
        help="visium-uni, visium-hoptimus, xenium, or the whole-slide visium-slide and xenium-slide (BENCHMARKS.md).",
    ),
    backends: Optional[str] = typer.Option(
        None,
        help="Comma-separated backends (default torch,ort-cpu); eager torch is always measured, except with an .onnx "
        "--model, where the first backend is the baseline (default ort-cpu).",
    ),
    model: Optional[Path] = typer.Option(
        None,
        "--model",
        help="Benchmark this model instead of random weights: a checkpoint, or an .onnx export to compare ONNX "
        "backends with each other (needs no PyTorch).",
    ),
    batch_size: Optional[int] = typer.Option(None, help="Items per batch (default: the workload's CPU / GPU batch)."),
    repeats: Optional[int] = typer.Option(None, help="Timed repeats per backend (default 5; 3 with --quick)."),
    warmup: int = typer.Option(2, help="Untimed runs per backend first."),
    quick: bool = typer.Option(False, "--quick", help="Toy sizes with the workload's structure (smoke test)."),
    device: int = typer.Option(0, help="GPU index for the GPU backends."),
    precision: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (torch, ort-trt, tensorrt)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for onnxruntime (default: physical cores)."),
    allow_fallback: bool = typer.Option(
        False, "--allow-fallback", help="Run on another backend if one is unavailable."
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the torch-cuda backend."),
    torch_graph: str = typer.Option("eager", help=TORCH_GRAPH_HELP + " The eager baseline is always eager."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
    items: Optional[int] = typer.Option(
        None, help="Whole-slide workloads: items on the slide (default: the workload's)."
    ),
    cli: bool = typer.Option(
        False, "--cli", help="Whole-slide workloads: also time `deepspot infer` end to end (start-up included)."
    ),
) -> None:
    """Throughput of each backend against the eager PyTorch model, measured side by side in one process.

    On a GPU the baseline is eager PyTorch on the same GPU, and each GPU backend's row gives its fraction of the
    bus-fed limit (host-to-device bandwidth measured in the same run). Whole-slide workloads run each backend in the
    indexed layout over the slide and compare it with the eager model in the per-item layout."""
    from ..runtime.bench import run_bench

    onnx_model = model is not None and model.suffix.lower() == ".onnx"
    backends = backends or ("ort-cpu" if onnx_model else "torch,ort-cpu")
    names = [b.strip() for b in backends.split(",") if b.strip()]
    if json_out is not None:
        from ..fileio import check_output_file

        check_output_file(json_out, "--json", [model], ".json")  # before the benchmark, not after it
    with _announce_fallbacks():
        report = run_bench(
            workload,
            names,
            batch_size=batch_size,
            repeats=(3 if quick else 5) if repeats is None else repeats,
            warmup=warmup,
            quick=quick,
            options=_options(device, precision, threads, compile, torch_graph=torch_graph),
            allow_fallback=allow_fallback,
            model=model,
            n_items=items,
            cli=cli,
        )
    print_bench(report)
    if json_out is not None:
        report.save(json_out)
        typer.echo(f"wrote {json_out}")


def print_bench(report) -> None:
    """The benchmark report as a rich table, with the GEMM rate and the bound beneath it."""
    from rich.table import Table

    w = report.workload
    bus = getattr(report, "bus_gb_per_s", None)
    table = Table(
        title=f"{w['name']}: {w['family']}/{w['mode']}, D={w['input_size']} H={w['phi2rho_size']} "
        f"E={w['n_ensemble']} G={w['output_size']}"
        + (f", {w['n_items']:,} items by index" if w.get("layout") == "indexed" else "")
        + f", {report.repeats} repeats"
    )
    for column in (
        "backend",
        "device",
        "batch",
        "items/s",
        f"x {getattr(report, 'baseline', 'torch')}",
        "p50 ms",
        "p95 ms",
        "peak RSS MiB",
        "GFLOP/s",
        "of GEMM",
        "of bound",
        *(["of bus"] if bus else []),
    ):
        table.add_column(column, justify="left" if column in ("backend", "device") else "right")

    def percent(x) -> str:
        return "-" if x is None else f"{x:.0%}"

    for r in report.results:
        table.add_row(
            r.backend,
            r.device,
            str(r.batch_size),
            f"{r.items_per_s:,.1f}",
            f"{r.ratio_to_torch:.2f}",
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            f"{r.peak_rss_mb:,.0f}",
            f"{r.gflops:.1f}",
            percent(r.fraction_of_gemm),
            percent(r.fraction_of_bound),
            *([percent(r.fraction_of_bus)] if bus else []),
        )
    console = _console()
    console.print(table)
    if bus:
        console.print(
            f"Host-to-device bandwidth, measured in this run: {bus['pinned_gb_per_s']:.1f} GB/s from page-locked "
            f"memory, {bus['pageable_gb_per_s']:.1f} GB/s from pageable. A GPU backend's 'of bus' is its rate over "
            "the bus-fed limit (page-locked bandwidth / input bytes per item, BENCHMARKS.md); the CPU's GEMM rate "
            "does not bound it, so its 'of GEMM' and 'of bound' are '-'. A GPU backend streams "
            "several batches per repeat through the overlapping pipeline; its latencies are per batch."
        )
    console.print(
        f"GEMM fp32 (4096x1024 @ 1024x5120): {report.gemm_gflops:.1f} GFLOP/s; "
        f"{report.flops_per_item / 1e6:.1f} MFLOP per item as BENCHMARKS.md counts it "
        f"({report.flops_per_item_folded / 1e6:.1f} with Rho folded"
        f"{', in the indexed layout' if w.get('layout') == 'indexed' else ''}; GFLOP/s and 'of GEMM' count what each "
        f"backend computes, 'of bound' the folded figure); bound "
        f"{report.bound_items_per_s:,.0f} items/s. Peak RSS: {report.peak_rss_scope}."
    )
    for r in report.results:
        if "(CLI:" in r.backend:
            backend = r.backend.split(" (")[0]
            inside = next((x for x in report.results if x.backend.startswith(f"{backend} (indexed")), None)
            if inside is not None and inside.items_per_s > 0:
                console.print(
                    f"{backend}: `deepspot infer` end to end (a subprocess, start-up and output file included) runs "
                    f"at {r.items_per_s / inside.items_per_s:.0%} of the in-process rate"
                )


@engine_app.command("build")
@handle_errors
def engine_build(
    model: Path = typer.Argument(..., help="The ONNX file (deepspot export)."),
    output: Path = typer.Option(..., "--output", "-o", help="The .plan to write."),
    fp16: bool = typer.Option(False, "--fp16", help="Let TensorRT run layers in fp16."),
    bf16: bool = typer.Option(False, "--bf16", help="Let TensorRT run layers in bf16."),
    max_batch: int = typer.Option(4096, help="Largest (and optimal) batch of the optimisation profile."),
    bag_sizes: Optional[str] = typer.Option(
        None, help="Bag sizes to pin, e.g. subspot=9,neighbors=6 (default: 1..64)."
    ),
    device: int = typer.Option(0, help="GPU to build for."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file, reused between builds."),
) -> None:
    """Build a native TensorRT engine from an ONNX graph, with an optimisation profile."""
    from ..runtime.trt import engine_from_onnx, import_trt

    import_trt()  # before anything else: on a machine without TensorRT this is the one thing to say
    if fp16 and bf16:
        fail("give --fp16 or --bf16, not both")
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    path = engine_from_onnx(
        model, output, precision, max_batch, _bag_sizes(bag_sizes), device, timing_cache=timing_cache
    )
    typer.echo(f"wrote {path} ({precision}, batch 1..{max_batch})")


@app.command()
@handle_errors
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Show what this machine can run: each backend (or why not), the GPU, driver, CUDA and cuDNN, versions."""
    from ..runtime.doctor import diagnose, render

    report = diagnose()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, _console())


@engine_app.command("info")
@handle_errors
def engine_info(plan: Path = typer.Argument(..., help="A .plan written by `deepspot engine build`.")) -> None:
    """Print what an engine was built from and for (works without TensorRT)."""
    from ..runtime.trt import read_plan_header

    header, _ = read_plan_header(plan)
    model = {k: v for k, v in (header.pop("model", None) or {}).items() if k not in ("scaler", "genes", "config")}
    typer.echo(json.dumps({**header, "model": model}, indent=2, default=str))


@app.command()
@handle_errors
def quickstart(
    workdir: Optional[Path] = typer.Option(
        None, help="Keep the files here (default: a temporary folder, removed after)."
    ),
    seed: int = typer.Option(0, help="Seed of the data, the weights and the inputs."),
) -> None:
    """Synthetic data -> train -> export -> infer -> parity -> bench, on the CPU in about 15 seconds."""
    from ..quickstart import print_quickstart, run_quickstart

    console = _console()
    result = run_quickstart(workdir, seed, log=lambda line: console.print(f"[dim]{line}[/dim]"))
    print_quickstart(result, console)
    if not result.passed:
        raise typer.Exit(1)
