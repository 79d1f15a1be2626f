"""Checkpoints: one ``.safetensors`` file that rebuilds the model alone.

The tensors are the state dict under the reference's keys. The header's metadata holds one JSON document
(``deepspot``) with the family, the mode, every constructor argument, the scaler's arrays, the gene names and the
training history. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._version import __version__
from .assemble import from_parts, shapes_of
from .errors import CheckpointError, InputError, folder_hint
from .fileio import atomic_path, check_output_file, file_sha256

FORMAT = "deepspot-checkpoint"
FORMAT_VERSION = 1
REFERENCE_SUFFIXES = (".pkl", ".ckpt", ".pt", ".pth", ".bin")
#: What ``deepspot export`` and ``deepspot engine build`` write: runtime files, not checkpoints.
EXPORT_SUFFIXES = (".onnx", ".plan", ".engine")
#: Data files a command takes beside a model (feature bundles, AnnData, tile features): named as such when given as one.
DATA_SUFFIXES = (".npz", ".npy", ".h5ad", ".h5", ".hdf5", ".csv")


def model_metadata(model) -> dict[str, Any]:
    """Everything but the weights needed to rebuild ``model``, as JSON-serialisable data."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deepspot_version": __version__,
        "family": model.family,
        "mode": model.mode.name,
        "config": dict(model.config),
        "scaler": None if model.scaler is None else model.scaler.to_dict(),
        "genes": None if model.genes is None else [str(g) for g in model.genes],
        "history": model.history,
    }


def save(model, path: str | Path, no_clobber: bool = False) -> Path:
    """Write a model to a ``.safetensors`` checkpoint, atomically: the weights under the reference's keys, and the
    family, mode, constructor arguments, scaler, gene names and training history in its metadata. The same model gives
    the same bytes.

    Args:
        model: A DeepSpot or DeepCell (:func:`deepspot.create_model`, :func:`deepspot.load`).
        path: The file to write, ending in ``.safetensors``; its folder must exist. An existing file is replaced.
        no_clobber: Refuse to replace an existing file instead.

    Returns:
        ``path``.

    Raises:
        TypeError: ``model`` is not a DeepSpot or DeepCell.
        InputError: ``path`` does not end in ``.safetensors`` (``deepspot.load`` would take a ``.pt`` or ``.pkl`` for
            a reference file, and an ``.onnx`` name is an export's).
        DeepSpotError: The folder is missing or not writable, ``path`` is a folder, or it exists and ``no_clobber``.
    """
    from .base import DeepSetModel

    if not isinstance(model, DeepSetModel):
        raise TypeError(f"deepspot.save writes a DeepSpot or DeepCell model, not a {type(model).__name__}")
    path = check_output_file(path, "checkpoint")
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path}: a checkpoint is a .safetensors file; give a name ending in .safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors stores the metadata map in no fixed order, and equal models must give equal bytes.
    meta = {"deepspot": json.dumps(model_metadata(model))}
    with atomic_path(path, no_clobber=no_clobber) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint's metadata without loading its tensors."""
    path = Path(path)
    return _open(path)[0]


def _open(path: Path, with_tensors: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata, and the tensors once their shapes have been checked against it (before any is read)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file{folder_hint(path)}")
    if path.suffix.lower() in DATA_SUFFIXES:
        raise CheckpointError(f"{path}: a data file ({path.suffix.lower()}), not a model; give a .safetensors "
                              "checkpoint or a reference file (.pkl, .ckpt, .pt)")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            meta = _parse_metadata(path, raw)
            if not with_tensors:
                return meta, {}
            shapes_of(meta, {k: f.get_slice(k).get_shape() for k in f.keys()}, source=str(path))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors checkpoint ({str(e).splitlines()[0]})") from None
    return meta, tensors


def _parse_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    if "deepspot" not in raw:
        raise CheckpointError(f"{path}: a .safetensors file, but not a deepspot checkpoint (no deepspot metadata)")
    try:
        meta = json.loads(raw["deepspot"])
    except (json.JSONDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{path}: corrupt deepspot metadata ({reason})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a .safetensors file, but not a deepspot checkpoint (unknown format)")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"{path}: corrupt deepspot metadata (format_version {str(version)[:32]!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this deepspot supports ({FORMAT_VERSION})"
        )
    return meta


def load(path: str | Path):
    """Load a model, in eval mode, from a deepspot checkpoint or a reference file.

    ``.safetensors`` files are deepspot checkpoints (:func:`save`). Reference files (``.pkl``, ``.ckpt``, ``.pt``,
    ``.pth``, ``.bin``) are imported on the fly with :func:`deepspot.importer.import_reference` (safely: nothing in
    them is executed). Either way every claim of the file is checked before memory is allocated for it
    (:mod:`deepspot.assemble`). Unlike building a model (:func:`deepspot.create_model` seeds Python, NumPy and torch
    as the reference does), loading leaves the global random state as it was.

    Args:
        path: The checkpoint or reference file.

    Returns:
        The :class:`~deepspot.spot.DeepSpot` or :class:`~deepspot.cell.DeepCell`, with its ``scaler``, ``genes`` and
        ``history``. Call it with ``float32`` tensors ``(B, n, D)`` by name (``spot=``, ``subspot=``,
        ``neighbors=``, ``cell=``) for ``(B, G)`` predictions; ``model.inverse_transform`` maps them to the original
        scale.

    Raises:
        CheckpointError: The file is missing, truncated, foreign, an ONNX export or TensorRT plan (run those with
            :func:`deepspot.runtime.load_runner`), or does not match its hyperparameters.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in REFERENCE_SUFFIXES:
        from .importer import import_reference

        return import_reference(path)
    if suffix in EXPORT_SUFFIXES and path.is_file():
        raise CheckpointError(f"{path}: an exported model, not a checkpoint; run it with deepspot.runtime.load_runner "
                              "(deepspot.load reads .safetensors checkpoints and reference files)")  # fmt: skip
    meta, tensors = _open(path, with_tensors=True)
    return from_parts(meta, tensors, source=str(path))


def describe(path: str | Path) -> dict[str, Any]:
    """What ``deepspot info`` shows of a checkpoint or reference file: the family and mode, every constructor
    argument, the genes, the scaler, the number of parameters and, for a trained checkpoint, how training ended. The
    file is loaded as :func:`load` does (so it is checked, and nothing in a reference file is executed)."""
    path = Path(path)
    model = load(path)
    history = model.history or {}
    trained = None
    if history.get("epoch_train_loss"):
        trained = {
            "epochs": len(history["epoch_train_loss"]),
            "stopped": history.get("stopped"),
            "last_train_loss": history["epoch_train_loss"][-1],
            "last_val_loss": (history.get("epoch_val_loss") or [None])[-1],
        }
    return {
        "path": str(path),
        "format": "deepspot checkpoint" if path.suffix.lower() == ".safetensors" else "reference file",
        "family": model.family,
        "mode": model.mode.name,
        "config": dict(model.config),
        "genes": None if model.genes is None else [str(g) for g in model.genes],
        "scaler": None if model.scaler is None else model.scaler.to_dict(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "training": trained,
    }


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    return file_sha256(path)
