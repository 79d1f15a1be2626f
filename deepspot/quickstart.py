"""``deepspot quickstart``: the whole path on embedded synthetic data, in about 15 seconds on a 2-core CPU.

synth -> train -> export -> infer -> parity -> bench, each step through the same library call the matching command
uses, with the files left in a work folder. The data and model are small on purpose (64 features, 32 genes); the
steps and the file formats are the real ones.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import check_seed
from .errors import DeepSpotError

FAMILY, MODE = "spot", "subspot_neighbors"
SIZES = dict(input_size=64, genes=32, phi2rho_size=64, n_train=1600, n_test=400, epochs=6, batch_size=128)


@dataclass
class Step:
    """One step of the quickstart: what ran, how long it took, and what came out."""

    name: str
    seconds: float
    result: str
    ok: bool = True


@dataclass
class QuickstartResult:
    """Every step, the folder holding the files, and the figures a reader wants first."""

    workdir: Path
    steps: list[Step] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(step.ok for step in self.steps)


def run_quickstart(
    workdir: str | Path | None = None, seed: int = 0, log: Callable[[str], None] = lambda line: None
) -> QuickstartResult:
    """Run the quickstart; with ``workdir=None`` the files live in a temporary folder removed afterwards.

    Args:
        workdir: Folder for the bundle, checkpoint, ONNX file, predictions and reports (created if missing; its
            parent must exist).
        seed: Seed of the synthetic data, the initial weights and the random inputs.
        log: Called with a line as each step starts.
    """
    check_seed(seed)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="deepspot-quickstart-") as tmp:
            return _run(Path(tmp), seed, log)
    from .fileio import check_output_folder

    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise DeepSpotError(f"{workdir}: exists and is not a directory")
    check_output_folder(workdir, "workdir")
    workdir.mkdir(exist_ok=True)
    return _run(workdir, seed, log)


def _run(folder: Path, seed: int, log: Callable[[str], None]) -> QuickstartResult:
    import torch

    from . import checkpoint
    from .data import save_bundle, synth_bundle
    from .export import export_onnx
    from .factory import create_model
    from .runtime import check_parity, infer
    from .runtime.bench import Workload, run_bench
    from .runtime.parity import pearson_per_column
    from .train import TrainConfig, fit

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    out = QuickstartResult(folder)
    s = SIZES

    def step(name: str, fn: Callable[[], tuple[str, bool]]) -> None:
        log(f"{name} ...")
        start = time.perf_counter()
        text, ok = fn()
        out.steps.append(Step(name, time.perf_counter() - start, text, ok))

    # One draw for train and test: the hidden gene programs depend on the seed, so both halves share them.
    arrays = synth_bundle(FAMILY, MODE, s["n_train"] + s["n_test"], s["input_size"], s["genes"], seed)
    n = s["n_train"]
    train = {k: v[:n] if k not in ("genes",) else v for k, v in arrays.items()}
    test = {k: v[n:] if k not in ("genes",) else v for k, v in arrays.items()}
    paths = {
        k: folder / v
        for k, v in dict(
            train="train.npz",
            test="test.npz",
            ckpt="model.safetensors",
            onnx="model.onnx",
            pred="predictions.npz",
            parity="parity.json",
            bench="bench.json",
        ).items()
    }

    def synth():
        save_bundle(paths["train"], train)
        save_bundle(paths["test"], test)
        return f"{n} + {s['n_test']} spots, {s['input_size']} features, {s['genes']} genes, S=9, N=6", True

    model = create_model(
        FAMILY,
        MODE,
        input_size=s["input_size"],
        output_size=s["genes"],
        phi2rho_size=s["phi2rho_size"],
        lr=3e-3,
        p=0.1,
        random_seed=seed,
    )

    def train_():
        config = TrainConfig(
            epochs=s["epochs"], batch_size=s["batch_size"], val_fraction=0.1, normalize=True, progress=False
        )
        history = fit(model, {k: train[k] for k in model.mode.input_names}, train["target"], config)
        model.genes = [str(g) for g in arrays["genes"]]
        checkpoint.save(model, paths["ckpt"])
        first, last = history["epoch_train_loss"][0], history["epoch_train_loss"][-1]
        return f"{history['epochs']} epochs, train loss {first:.3f} -> {last:.3f}", last < first

    def export():
        result = export_onnx(paths["ckpt"], paths["onnx"])
        err = result.validation.max_abs_err if result.validation else float("nan")
        return f"{paths['onnx'].name}, {result.size_bytes / 1e6:.1f} MB, validated (max abs err {err:.1e})", True

    def infer_():
        result = infer(paths["onnx"], paths["test"], paths["pred"], "ort-cpu", 128, inverse_transform=True)
        with np.load(paths["pred"]) as z:
            r = float(np.nanmean(pearson_per_column(z["predictions"], test["target"])))
        out.figures["test_mean_gene_pearson"] = r
        return f"{result.n} spots on ort-cpu, {result.items_per_s:,.0f} items/s; mean gene r vs truth {r:.2f}", r > 0.3

    def parity():
        report = check_parity(paths["ckpt"], paths["onnx"], "ort-cpu", bundle=paths["test"])
        report.save(paths["parity"])
        o = report.outputs[0]
        return f"max abs err {o.max_abs:.1e} (limit {o.limit:.1e}), min gene r {o.min_pearson:.6f}", report.passed

    def bench():
        w = Workload(
            "quickstart",
            FAMILY,
            MODE,
            s["input_size"],
            s["phi2rho_size"],
            10,
            s["genes"],
            {"subspot": 9, "neighbors": 6},
            256,
            256,
        )
        report = run_bench(w, ["torch", "ort-cpu"], repeats=5, warmup=1, model=model, workdir=folder)
        report.save(paths["bench"])
        ort, eager = report.result("ort-cpu"), report.result("torch")
        out.figures["ort_cpu_ratio"] = ort.ratio_to_torch
        return (
            f"ort-cpu {ort.items_per_s:,.0f} items/s vs eager torch {eager.items_per_s:,.0f}: "
            f"{ort.ratio_to_torch:.1f}x (batch 256, 5 repeats)"
        ), ort.ratio_to_torch > 0

    for name, fn in (
        ("synth", synth),
        ("train", train_),
        ("export", export),
        ("infer", infer_),
        ("parity", parity),
        ("bench", bench),
    ):
        step(name, fn)
        if not out.steps[-1].ok:
            break
    return out


def print_quickstart(result: QuickstartResult, console=None) -> None:
    """The steps as a short table, then where the files are."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="deepspot quickstart")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    table.add_column("")
    for s in result.steps:
        table.add_row(s.name, f"{s.seconds:.1f}", s.result, "[green]ok[/green]" if s.ok else "[red]FAILED[/red]")
    console.print(table)
    console.print(f"files in {result.workdir}" if result.workdir.exists() else "files removed (no --workdir given)")
