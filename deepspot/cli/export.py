"""``deepspot export`` and ``deepspot info``: each maps its options onto one library call in :mod:`deepspot.export`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import ConfigError
from ..export.metadata import DEFAULT_OPSET
from .core import NO_CLOBBER_HELP, app, handle_errors


def _untrained_model(
    family: str,
    mode: str | None,
    input_size: int | None,
    output_size: int | None,
    phi2rho_size: int | None,
    n_ensemble: int | None,
    n_ensemble_phi: int | None,
    n_ensemble_rho: int | None,
    random_seed: int,
    agg_neighbors: str | None,
):
    """A freshly initialised model from constructor arguments (for benchmarks: no checkpoint needed)."""
    from ..factory import create_model
    from ..modes import DEFAULT_MODE, check_family

    check_family(family)
    if input_size is None or output_size is None:
        raise ConfigError("an untrained export needs --input-size and --output-size")
    kwargs = dict(input_size=input_size, output_size=output_size, random_seed=random_seed)
    optional = dict(
        phi2rho_size=phi2rho_size, n_ensemble=n_ensemble, n_ensemble_phi=n_ensemble_phi, n_ensemble_rho=n_ensemble_rho
    )
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if agg_neighbors is not None:
        if family != "cell":
            raise ConfigError("--agg-neighbors applies to the cell family only")
        kwargs["agg_neighbors"] = agg_neighbors
    model = create_model(family, mode or DEFAULT_MODE[family], **kwargs)
    return model.eval()


@app.command("export")
@handle_errors
def export_command(
    checkpoint: Path | None = typer.Argument(
        None, help="Checkpoint to export (.safetensors, or a reference .pkl/.ckpt). Leave out with --family."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="The .onnx file to write, replaced if it exists (a new folder for --layout indexed)."
    ),
    no_clobber: bool = typer.Option(False, "--no-clobber", help=NO_CLOBBER_HELP),
    layout: str = typer.Option(
        "dense", "--layout", help="dense: one graph per item; indexed: encoder.onnx + head.onnx for whole slides."
    ),
    table_dtype: str = typer.Option(
        "fp32", "--table-dtype", help="Indexed: dtype of the embedding table, fp32 or fp16."
    ),
    mode: str | None = typer.Option(None, "--mode", "-m", help="Forward mode; default and only choice: the model's."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 (weights and compute)."),
    io: str | None = typer.Option(None, "--io", help="Dtype of inputs and output: fp32 (default) or fp16."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Fuse Phi, fold Rho, drop dropout."),
    fold_scaler: bool = typer.Option(False, "--fold-scaler", help="Output expression on the original scale."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset, 17 to 20."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Check parity in onnxruntime (CPU)."),
    family: str | None = typer.Option(None, "--family", help="Export an untrained model of this family."),
    input_size: int | None = typer.Option(None, "--input-size", help="Untrained: features per tile."),
    output_size: int | None = typer.Option(None, "--output-size", help="Untrained: number of genes."),
    phi2rho_size: int | None = typer.Option(None, "--phi2rho-size", help="Untrained: Phi embedding width."),
    n_ensemble: int | None = typer.Option(None, "--n-ensemble", help="Untrained: ensemble size."),
    n_ensemble_phi: int | None = typer.Option(None, "--n-ensemble-phi", help="Untrained: Phi ensemble size."),
    n_ensemble_rho: int | None = typer.Option(None, "--n-ensemble-rho", help="Untrained: Rho ensemble size."),
    random_seed: int = typer.Option(2024, "--random-seed", help="Untrained: seed of the initial weights."),
    agg_neighbors: str | None = typer.Option(None, "--agg-neighbors", help="Untrained cell: max, mean or sum."),
    triton: Path | None = typer.Option(
        None, "--triton", help="Also write a Triton model repository here (REPO/NAME/config.pbtxt, REPO/NAME/1/)."
    ),
    name: str | None = typer.Option(None, "--name", help="Triton: the model's name (default: the output's stem)."),
    max_batch: int = typer.Option(256, "--max-batch", help="Triton: max_batch_size of the dynamic batcher."),
    instances: int = typer.Option(1, "--instances", help="Triton: model instances per device."),
    kind: str = typer.Option("gpu", "--kind", help="Triton: gpu or cpu instances."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Triton: the TensorRT execution accelerator."),
    fp16: bool = typer.Option(False, "--fp16", help="Triton with --tensorrt: TensorRT runs in fp16."),
) -> None:
    """Export a model in one forward mode to a validated ONNX file (and, with --triton, a Triton repository)."""
    from ..export import export_onnx

    from ..fileio import check_clobber

    if checkpoint is None and family is None:
        raise ConfigError("give the CHECKPOINT to export, or --family (with --input-size and --output-size) for an "
                          "untrained model")  # fmt: skip
    if checkpoint is not None and family is not None:
        raise ConfigError("give either a CHECKPOINT or --family (with --input-size and --output-size), not both")
    # Options that would be ignored are refused, naming the first.
    ignored = []
    if checkpoint is not None:  # the checkpoint fixes the model: the untrained model's options do not apply
        untrained = {"--input-size": input_size, "--output-size": output_size, "--phi2rho-size": phi2rho_size,
                     "--n-ensemble": n_ensemble, "--n-ensemble-phi": n_ensemble_phi,
                     "--n-ensemble-rho": n_ensemble_rho, "--agg-neighbors": agg_neighbors,
                     "--random-seed": random_seed if random_seed != 2024 else None}  # fmt: skip
        ignored += [f"{k} applies to an untrained export (--family) only: the checkpoint fixes the model"
                    for k, v in untrained.items() if v is not None]  # fmt: skip
    if triton is None:
        serving = {"--name": name, "--max-batch": max_batch != 256, "--instances": instances != 1,
                   "--kind": kind != "gpu", "--tensorrt": tensorrt, "--fp16": fp16}  # fmt: skip
        ignored += [f"{k} applies to --triton REPO only" for k, v in serving.items() if v]
    if layout != "indexed" and table_dtype != "fp32":
        ignored.append("--table-dtype applies to --layout indexed only")
    if ignored:
        raise ConfigError(ignored[0])
    check_clobber(output, no_clobber)
    triton_options = dict(name=name, max_batch=max_batch, instances=instances, kind=kind, tensorrt=tensorrt, fp16=fp16)
    if triton is not None:
        if layout == "indexed":
            raise ConfigError(
                "--triton serves the per-item graph: the indexed layout's head gathers neighbours from a whole "
                "slide's embedding table, which a Triton request does not carry; export with --layout dense"
            )
        from ..export.triton import check_name, check_triton_options, check_triton_repo

        # Before the export: a bad option, repository or model name costs nothing, and the .onnx is not left behind
        # by a command that then fails.
        check_triton_options(**triton_options)
        check_triton_repo(triton)
        check_name(name or output.stem)
    if checkpoint is not None:
        source = checkpoint
    else:
        source = _untrained_model(
            family,
            mode,
            input_size,
            output_size,
            phi2rho_size,
            n_ensemble,
            n_ensemble_phi,
            n_ensemble_rho,
            random_seed,
            agg_neighbors,
        )
    if layout == "indexed":
        from ..export.indexed import export_indexed

        if mode is not None:
            from ..export.graph import check_mode
            from ..export.exporter import load_model

            source, _ = load_model(source)
            check_mode(source, mode)
        folder = export_indexed(
            source, output, precision=precision, io_dtype=io, optimize=optimize, fold_scaler=fold_scaler,
            table_dtype=table_dtype, opset=opset, validate=validate,
        )  # fmt: skip
        typer.echo(
            f"wrote {folder}/encoder.onnx and {folder}/head.onnx (indexed layout, {precision}, table {table_dtype})"
        )
        return
    if layout != "dense":
        raise ConfigError(f"unknown layout {layout!r}; expected dense or indexed")
    result = export_onnx(
        source,
        output,
        mode=mode,
        precision=precision,
        io_dtype=io,
        optimize=optimize,
        fold_scaler=fold_scaler,
        opset=opset,
        validate=validate,
    )
    typer.echo(result.summary())
    if result.validation is None:
        typer.echo("validation: skipped (--no-validate)")
    else:
        typer.echo(result.validation.table())
        typer.echo(result.validation.summary())
    if triton is not None:
        _write_triton(output, triton, **triton_options)


def _write_triton(model: Path, repo: Path, **options) -> None:
    from ..export.triton import write_triton_repository

    written = write_triton_repository(model, repo, **options)
    typer.echo(f"wrote {written.config} and {written.model} (validated against Triton's model configuration schema)")


@app.command("triton")
@handle_errors
def triton_command(
    model: Path = typer.Argument(..., help="An exported .onnx file (the per-item graph)."),
    repo: Path = typer.Argument(..., help="The Triton model repository (created if missing; its parent folder must exist)."),
    name: str | None = typer.Option(None, "--name", help="The model's name (default: the file's stem)."),
    max_batch: int = typer.Option(256, "--max-batch", help="max_batch_size of the dynamic batcher."),
    instances: int = typer.Option(1, "--instances", help="Model instances per device."),
    kind: str = typer.Option("gpu", "--kind", help="gpu or cpu instances."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="The TensorRT execution accelerator."),
    fp16: bool = typer.Option(False, "--fp16", help="With --tensorrt: TensorRT runs in fp16."),
) -> None:
    """Write a Triton model repository (onnxruntime backend) for an exported model; needs no PyTorch."""
    _write_triton(model, repo, name=name, max_batch=max_batch, instances=instances, kind=kind, tensorrt=tensorrt,
                  fp16=fp16)  # fmt: skip


@app.command("info")
@handle_errors
def info_command(
    model: Path = typer.Argument(
        ..., help="An ONNX file, an indexed export's folder (both its graphs), or a checkpoint (.safetensors, or a "
        "reference .pkl/.ckpt/.pt, read safely)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Print an ONNX model's inputs and outputs with their dynamic axes and its deepspot metadata, or what a
    checkpoint holds (family, mode, constructor arguments, genes, scaler, parameters, how training ended)."""
    from ..errors import folder_hint
    from ..export import indexed_export_info, model_info
    from ..runtime.artifacts import artifact_kind

    # a folder is an indexed export (or says why not), unless it is the one `deepspot train` writes (named as such)
    kind = "onnx" if model.is_dir() and not folder_hint(model) else artifact_kind(model)
    if kind == "plan":
        raise ConfigError(f"{model}: a TensorRT engine; `deepspot engine info {model}` reads its header")
    if kind == "model":
        from ..checkpoint import describe

        _echo_checkpoint(describe(model), as_json)
        return
    if model.is_dir():
        graphs = indexed_export_info(model)
        if as_json:
            payload = {k: _info_payload(v) for k, v in graphs.items()}
            typer.echo(json.dumps({"path": str(model), "layout": "indexed", "graphs": payload}, indent=2))
        else:
            typer.echo(f"{model}: an indexed export (deepspot export --layout indexed), two graphs")
            typer.echo("\n\n".join(f"{role}: {info.format()}" for role, info in graphs.items()))
        return
    info = model_info(model)
    if as_json:
        typer.echo(json.dumps(_info_payload(info), indent=2))
    else:
        typer.echo(info.format())


def _echo_checkpoint(d: dict, as_json: bool) -> None:
    from ..export.info import short_value

    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    lines = [f"{d['path']}: a {d['format']}, {d['family']}/{d['mode']}, {d['parameters']:,} parameters"]
    for key in ("config", "genes", "scaler"):
        lines.append(f"  {key}: {'none' if d[key] is None else short_value(key, d[key])}")
    t = d["training"]
    if t is None:
        lines.append("  training: no history in the file")
    else:
        val = "" if t["last_val_loss"] is None else f", last validation loss {t['last_val_loss']:.6g}"
        lines.append(f"  training: {t['epochs']} epoch{'' if t['epochs'] == 1 else 's'}, stopped by {t['stopped']}, "
                     f"last train loss {t['last_train_loss']:.6g}{val}")  # fmt: skip
    typer.echo("\n".join(lines))


def _info_payload(info) -> dict:
    return {
        "path": str(info.path),
        "opset": info.opset,
        "producer": info.producer,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in info.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in info.outputs],
        "metadata": info.metadata,
    }
