"""``deepspot synth`` and ``deepspot train``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer

from .core import NO_CLOBBER_HELP, app, handle_errors


@app.command()
@handle_errors
def synth(
    out_arg: Optional[Path] = typer.Argument(
        None, metavar="[OUT]", help="Output bundle: a .npz file (replaced if it exists), or a new directory of .npy files."
    ),
    out_opt: Optional[Path] = typer.Option(None, "--output", "-o", help="Output bundle, as OUT."),
    no_clobber: bool = typer.Option(False, "--no-clobber", help=NO_CLOBBER_HELP),
    family: str = typer.Option("spot", help="Model family: spot or cell."),
    mode: Optional[str] = typer.Option(
        None, help="Forward mode; decides which bags are written. Default: the family's full mode."
    ),
    n: int = typer.Option(1000, "--n", help="Number of spots or cells."),
    input_size: int = typer.Option(64, help="Features per tile (D)."),
    genes: int = typer.Option(32, help="Number of genes (G)."),
    subspots: int = typer.Option(9, help="Sub-spots per spot (S)."),
    neighbors: Optional[int] = typer.Option(None, help="Neighbours per item (K); default 6 for spots, 8 for cells."),
    seed: int = typer.Option(0, help="Seed of the generator."),
    dtype: str = typer.Option("fp32", "--dtype", help="Feature dtype: fp32, or fp16 (half the bytes to read and send)."),
) -> None:
    """Write a seeded synthetic feature bundle whose targets depend non-linearly on the features."""
    from ..data import cast_features, save_bundle, synth_bundle
    from ..errors import ConfigError
    from ..fileio import check_clobber
    from ..modes import DEFAULT_MODE, check_family

    if (out_arg is None) == (out_opt is None):
        raise ConfigError("give the output bundle once: as OUT or as -o/--output")
    out = out_arg or out_opt
    check_clobber(out, no_clobber)
    check_family(family)
    arrays = synth_bundle(family, mode or DEFAULT_MODE[family], n, input_size, genes, seed, subspots, neighbors,
                          stream=True)  # the neighbours drawn as they are written, never whole in memory
    save_bundle(out, cast_features(arrays, dtype))
    typer.echo(f"wrote {out}: {n} {family}s, {input_size} features, {genes} genes")


@app.command()
@handle_errors
def train(
    data: Path = typer.Option(..., "--data", help="Training bundle (.npz or directory of .npy) with a 'target' array."),
    family: str = typer.Option(..., help="Model family: spot or cell."),
    mode: Optional[str] = typer.Option(
        None, help="Forward mode (short or reference name). Default: the family's full mode."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output directory for model.safetensors, history.json and loss.png (replaced if there; created, but its "
        "parent folder must exist).",
    ),
    no_clobber: bool = typer.Option(False, "--no-clobber", help=NO_CLOBBER_HELP + " Checks DIR/model.safetensors."),
    val_data: Optional[Path] = typer.Option(None, help="Separate validation bundle (instead of --val-fraction)."),
    loss_func: str = typer.Option(
        "mse", help="Loss: mse, cos, mse_cos, pearson, mse_pearson, poisson (cell also l1, huber, l1_cos, huber_cos)."
    ),
    lr: float = typer.Option(1e-4, help="AdamW learning rate."),
    p: Optional[float] = typer.Option(None, help="Dropout of Phi and Rho (default 0.3 for spot, 0.2 for cell)."),
    p_phi: Optional[float] = typer.Option(None, help="Dropout of Phi; default --p."),
    p_rho: Optional[float] = typer.Option(None, help="Dropout of Rho; default --p."),
    n_ensemble: int = typer.Option(10, help="Ensemble size of Phi and Rho."),
    n_ensemble_phi: Optional[int] = typer.Option(None, help="Number of Phi networks; default --n-ensemble."),
    n_ensemble_rho: Optional[int] = typer.Option(None, help="Number of Rho networks; default --n-ensemble."),
    phi2rho_size: Optional[int] = typer.Option(
        None, help="Width of a Phi embedding (default 512 for spot, 1024 for cell)."
    ),
    emb_size: int = typer.Option(1024, help="Cell only; unused by the model, kept for compatibility."),
    weight_decay: float = typer.Option(1e-6, help="AdamW weight decay."),
    random_seed: int = typer.Option(
        2024, help="Seed for initial weights, dropout, shuffling and the validation split."
    ),
    agg_neighbors: str = typer.Option("max", help="Cell only: pooling over neighbours (max, mean or sum)."),
    epochs: int = typer.Option(10, help="Maximum number of epochs."),
    batch_size: int = typer.Option(1024, help="Items per optimisation step."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="Shuffle the training items every epoch."),
    val_fraction: Optional[float] = typer.Option(
        None, help="Fraction held out for validation (0 for none). Default: 0.1, or none with --val-data."
    ),
    normalize: bool = typer.Option(
        True, "--normalize/--no-normalize", help="Standardise targets; the scaler is stored with the model."
    ),
    early_stopping: bool = typer.Option(
        False, "--early-stopping/--no-early-stopping", help="Stop when the monitored loss stops improving."
    ),
    monitor: str = typer.Option("val_loss", help="Loss watched by early stopping: val_loss or train_loss."),
    patience: int = typer.Option(3, help="Epochs without improvement before early stopping."),
    min_delta: float = typer.Option(0.0, help="Smallest decrease that counts as an improvement."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a DeepSpot or DeepCell on a feature bundle; write DIR/model.safetensors, history.json and loss.png."""
    from ..checkpoint import save
    from ..checks import check_seed
    from ..data import load_bundle
    from ..errors import ConfigError, InputError
    from ..factory import create_model
    from ..fileio import atomic_path, check_clobber, check_output_folder
    from ..modes import DEFAULT_MODE, check_family
    from ..train import TrainConfig, check_optimizer, fit, plot_loss

    check_family(family)
    if family != "cell" and (agg_neighbors != "max" or emb_size != 1024):
        option = "--agg-neighbors" if agg_neighbors != "max" else "--emb-size"
        raise ConfigError(f"{option} applies to the cell family only")
    if val_data is not None and val_fraction is not None:
        raise ConfigError("give either --val-data or --val-fraction, not both")
    check_optimizer(lr, weight_decay)
    check_seed(random_seed, "--random-seed")
    check_clobber(out / "model.safetensors", no_clobber)
    mode = mode or DEFAULT_MODE[family]
    kwargs = dict(
        loss_func=loss_func,
        lr=lr,
        p_phi=p_phi,
        p_rho=p_rho,
        n_ensemble=n_ensemble,
        n_ensemble_phi=n_ensemble_phi,
        n_ensemble_rho=n_ensemble_rho,
        weight_decay=weight_decay,
        random_seed=random_seed,
    )
    if p is not None:
        kwargs["p"] = p
    if phi2rho_size is not None:
        kwargs["phi2rho_size"] = phi2rho_size
    if family == "cell":
        kwargs.update(emb_size=emb_size, agg_neighbors=agg_neighbors)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        shuffle=shuffle,
        val_fraction=0.0 if val_data else 0.1 if val_fraction is None else val_fraction,
        normalize=normalize,
        early_stopping=early_stopping,
        monitor=monitor,
        patience=patience,
        min_delta=min_delta,
        progress=progress,
    )
    bundle = load_bundle(data)
    m = bundle.validate(family, mode, require_target=True)
    input_size = int(bundle[m.bags[0].name].shape[-1])
    output_size = int(bundle["target"].shape[1])
    m = bundle.validate(family, m, input_size=input_size, require_target=True)
    val = None
    if val_data is not None:
        vb = load_bundle(val_data)
        vb.validate(family, m, input_size=input_size, output_size=output_size, require_target=True)
        if bundle.genes is not None and vb.genes is not None and vb.genes != bundle.genes:
            i = next(j for j, (a, b) in enumerate(zip(vb.genes, bundle.genes)) if a != b)
            raise InputError(
                f"{val_data}: its genes differ from the training bundle's (gene {i}: {vb.genes[i]!r}, "
                f"not {bundle.genes[i]!r}); validation targets must be the same genes in the same order"
            )
        val = vb
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    check_output_folder(out, "--out")
    model = create_model(family, m.name, input_size=input_size, output_size=output_size, **kwargs)
    model.genes = bundle.genes
    history = fit(
        model,
        bundle.inputs(m),
        bundle["target"],
        config,
        val_inputs=None if val is None else val.inputs(m),
        val_target=None if val is None else val["target"],
    )
    out.mkdir(exist_ok=True)
    # The three files are written beside their names first and take them together at the end, the model first (its
    # --no-clobber refusal then leaves the others untouched): an interrupt never pairs a new model with an old history.
    with contextlib.ExitStack() as files:
        plot = files.enter_context(atomic_path(out / "loss.png"))
        log = files.enter_context(atomic_path(out / "history.json"))
        weights = files.enter_context(atomic_path(out / "model.safetensors", no_clobber=no_clobber))
        save(model, weights)
        log.write_text(json.dumps(history, indent=2))
        plot_loss(history, plot)
    last_val = history["epoch_val_loss"][-1] if history["epoch_val_loss"] else None
    epochs = history["epochs"]
    msg = f"trained {epochs} epoch{'' if epochs == 1 else 's'}, last train loss {history['epoch_train_loss'][-1]:.4f}"
    if last_val is not None:
        msg += f", last val loss {last_val:.4f}"
    typer.echo(f"{msg}; wrote {out / 'model.safetensors'}, history.json, loss.png")
