"""``deepspot import`` (reference weights -> checkpoint) and ``deepspot bundle`` (reference features -> bundle)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .core import NO_CLOBBER_HELP, app, handle_errors


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
    features: Optional[Path] = typer.Option(None, "--features", help="Folder with one <barcode>.npy per spot or cell."),
    features_h5: Optional[Path] = typer.Option(
        None, "--features-h5", help="Instead: the slide's tile features as TRIDENT/CLAM write them (features, coords)."
    ),
    obs: Path = typer.Option(
        ..., "--obs", help="Coordinates: the sample's .h5ad (reference or scanpy names, obsm['spatial']) or a CSV "
        "(a barcode, cell_id or pandas index column, taken verbatim; Space Ranger's tissue_positions.csv and 1.x's "
        "tissue_positions_list.csv work)."
    ),
    out: Path = typer.Option(
        ...,
        "-o",
        "--output",
        help="Output bundle: a .npz file (replaced if it exists), or a new directory of .npy files; with --by, a folder "
        "of OUT/<sample>.npz (each replaced if it exists).",
    ),
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
    all_spots: bool = typer.Option(False, "--all-spots", help="Keep spots outside the tissue (obs in_tissue = 0)."),
    by: Optional[str] = typer.Option(
        None, "--by", help="Split by this obs column (the reference's sampleID): OUT/<sample>.npz, neighbours within it."
    ),
    no_clobber: bool = typer.Option(False, "--no-clobber", help=NO_CLOBBER_HELP),
) -> None:
    """Build a feature bundle from the reference's layout, with neighbours chosen the reference's way."""
    from ..errors import ConfigError, InputError
    from ..fileio import check_clobber
    from ..layout import write_bundle, write_sample_bundles

    if (features is None) == (features_h5 is None):
        raise ConfigError("give the features either as --features FOLDER or as --features-h5 SLIDE.h5")
    if features_h5 is not None and not features_h5.is_file():
        what = "no such file"
        if features_h5.is_dir():
            what = "a folder; give a folder of <barcode>.npy files as --features"
        raise InputError(f"{features_h5}: {what} (--features-h5 takes the slide's .h5 of tile features)")
    source = features or features_h5
    options = (family, radius, k, index, max_neighbors, dtype, all_spots)
    if by is None:
        check_clobber(out, no_clobber)
        written = {out.name: write_bundle(out, source, obs, *options)}
    else:
        written = write_sample_bundles(out, source, obs, by, *options, no_clobber=no_clobber)
    for name, arrays in written.items():
        own = "spot" if family == "spot" else "cell"
        n, d = arrays[own].shape[0], arrays[own].shape[-1]
        nb = arrays["neighbor_index"] if index else arrays["neighbors"]
        sub = f", {arrays['subspot'].shape[1]} sub-spots" if "subspot" in arrays else ""
        layout = "index" if index else "dense"
        where = out / f"{name}.npz" if by else out
        typer.echo(f"wrote {where}: {n} {own}s, {d} features{sub}, {nb.shape[1]} neighbour rows ({layout})")
