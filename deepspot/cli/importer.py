"""``deepspot import`` (reference weights -> checkpoint) and ``deepspot bundle`` (reference features -> bundle)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import NO_CLOBBER_HELP, app, handle_errors


@app.command("import")
@handle_errors
def import_weights(
    weights: Path = typer.Argument(..., help="Reference weights: final_model.pkl, a Lightning .ckpt or a state dict."),
    out: Path = typer.Option(..., "-o", "--output", help="Output checkpoint (.safetensors); replaced if it exists."),
    no_clobber: bool = typer.Option(False, "--no-clobber", help=NO_CLOBBER_HELP),
    hparams: Optional[Path] = typer.Option(
        None,
        "--hparams",
        help="YAML of hyperparameters; overrides the file's. Default: the file's own, else the YAML beside it.",
    ),
    genes: Optional[Path] = typer.Option(
        None, "--genes", help="Gene names: a text file (one per line) or the reference's CSV (gene_name, isPredicted)."
    ),
) -> None:
    """Import a DeepSpot or DeepCell trained by the reference code into a .safetensors checkpoint, executing nothing."""
    from ..checkpoint import save
    from ..errors import InputError
    from ..fileio import check_clobber
    from ..importer import import_reference

    if out.suffix != ".safetensors":
        raise InputError(f"{out}: the output checkpoint must end in .safetensors")
    check_clobber(out, no_clobber)
    model = import_reference(weights, hparams, genes)
    save(model, out, no_clobber=no_clobber)
    scaler = "no scaler" if model.scaler is None else f"{model.scaler.kind} scaler"
    typer.echo(
        f"imported {weights}: {model.family} model, mode {model.mode.name}, {model.input_size} features -> "
        f"{model.output_size} genes, {scaler}; wrote {out}"
    )


@app.command("bundle")
@handle_errors
def bundle(
    features: Path = typer.Option(..., "--features", help="Folder with one <barcode>.npy per spot or cell."),
    obs: Path = typer.Option(..., "--obs", help="Coordinates: the sample's .h5ad (obs) or a CSV with a barcode column"),
    out: Path = typer.Option(..., "-o", "--output", help="Output bundle: a .npz file, or a directory of .npy files."),
    family: str = typer.Option("spot", "--family", help="spot (Visium) or cell (Xenium)."),
    radius: float = typer.Option(1.0, "--radius", help="Spots: neighbours within this distance on both array axes."),
    k: int = typer.Option(45, "--k", help="Cells: nearest cells by pixel coordinates, the cell itself included."),
    index: bool = typer.Option(
        False, "--index/--dense", help="Store neighbours as neighbor_index (-1 = zero row) instead of copying features."
    ),
    max_neighbors: Optional[int] = typer.Option(
        None, "--max-neighbors", help="Pad bags to this many rows (the reference's data-set-wide largest bag)."
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="Feature dtype: fp32, or fp16 (half the bytes to read and send)."),
) -> None:
    """Build a feature bundle from the reference's layout, with neighbours chosen the reference's way."""
    from ..layout import write_bundle

    arrays = write_bundle(out, features, obs, family, radius, k, index, max_neighbors, dtype)
    own = "spot" if family == "spot" else "cell"
    n, d = arrays[own].shape[0], arrays[own].shape[-1]
    nb = arrays["neighbor_index"] if index else arrays["neighbors"]
    sub = f", {arrays['subspot'].shape[1]} sub-spots" if "subspot" in arrays else ""
    layout = "index" if index else "dense"
    typer.echo(f"wrote {out}: {n} {own}s, {d} features{sub}, {nb.shape[1]} neighbour rows ({layout})")
