"""Import models trained by the reference code: ``final_model.pkl`` pickles, Lightning ``.ckpt`` and ``.pt`` files.

Three kinds of file are read, all through :func:`deepspot.reference.safe_torch_load` (nothing in them is executed):

- a ``torch.save(model)`` pickle of the whole LightningModule (the published ``final_model.pkl``): the class name
  tells the family (``deepspot.spot.model.DeepSpot`` or ``deepspot.cell.model.DeepCell``), the module tree holds the
  weights, ``_hparams`` the constructor arguments, ``scaler`` the fitted scikit-learn scaler and ``training_loss`` /
  ``validation_loss`` the loss history;
- a Lightning training checkpoint (``.ckpt``): ``state_dict`` and ``hyper_parameters`` (scaler included);
- a plain state dict (``.pt``, ``.pth``, ``.bin``): the weights only; the family comes from the keys (``phi_spot.*``
  or ``phi_cell.*``) and the hyperparameters from a YAML.

Hyperparameters, in order of precedence: the ``hparams`` argument (a YAML path or a dict) overrides the file's own;
a file that carries none (a plain state dict) takes them from the YAML beside it, found by :func:`find_hparams`.
Keys that are not constructor arguments (``image_feature_model`` in the reference's YAML) are ignored, and a scaler
written as text (``StandardScaler()``, as the reference's YAML has it) carries no numbers and is ignored too.
"""

from __future__ import annotations

import csv
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .assemble import from_parts
from .errors import CheckpointError, ConfigError, DeepSpotError, option
from .factory import model_class
from .modes import get_mode
from .reference import BoundMethod, Record, safe_torch_load
from .scaler import Scaler

#: Model classes of the reference, by qualified name (``deepspot.model`` is the layout before May 2025).
MODEL_CLASSES = {
    "deepspot.spot.model.DeepSpot": "spot",
    "deepspot.model.DeepSpot": "spot",
    "deepspot.cell.model.DeepCell": "cell",
}
#: State-dict prefix of each family's Phi ensemble.
PHI_PREFIXES = {"phi_spot.": "spot", "phi_cell.": "cell"}
#: Names tried, in order, for the YAML beside a weights file (after ``<stem>.yaml``).
HPARAM_NAMES = ("hparams.yaml", "hparams.yml", "hparam.yaml", "top_param_overall.yaml")
#: Arguments that the reference resolves with ``x or default``: a stored 0 means "unset" there.
_OR_DEFAULT = ("p_phi", "p_rho", "n_ensemble_phi", "n_ensemble_rho")


def find_hparams(weights: str | Path) -> Path | None:
    """The YAML of hyperparameters beside ``weights``, or ``None``.

    Tried in order: ``<stem>.yaml`` / ``<stem>.yml``, then :data:`HPARAM_NAMES`, then the only ``.yaml``/``.yml``
    file of the folder if there is exactly one. Several candidates and none of these names: ``None`` (pass one).
    """
    weights = Path(weights)
    folder = weights.parent
    for name in (f"{weights.stem}.yaml", f"{weights.stem}.yml", *HPARAM_NAMES):
        if (folder / name).is_file():
            return folder / name
    yamls = sorted(p for p in folder.glob("*.y*ml") if p.suffix in (".yaml", ".yml") and p.is_file())
    return yamls[0] if len(yamls) == 1 else None


def load_hparams(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read hyperparameters from a YAML file (or copy a mapping).

    Raises:
        CheckpointError: The file is missing, not YAML, or not a mapping of names to values.
    """
    if isinstance(source, Mapping):
        return dict(source)
    import yaml

    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such hyperparameter file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable YAML file ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a readable YAML file (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping of hyperparameters, got {type(data).__name__}")
    return data


def read_genes(source: str | Path | Sequence[str]) -> list[str]:
    """Gene names from a list, a text file (one per line) or a CSV.

    A CSV needs a ``gene_name`` (or ``gene``, ``genes``, ``gene_id``) column. If it has the reference's
    ``isPredicted`` column (its ``info_highly_variable_genes.csv``), only the predicted genes are kept, in file order,
    which is the order of the model's outputs.

    Raises:
        CheckpointError: The file is missing, not text, has no gene column or a row shorter than its header.
    """
    if not isinstance(source, (str, Path)):
        return [str(g) for g in source]
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such gene list")
    try:
        if path.suffix.lower() not in (".csv", ".tsv"):
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            # Each row with the line it ends on: blank lines (skipped) and quoted line breaks make row numbers wrong.
            rows = [(row, reader.line_num) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise CheckpointError(f"{path}: not a readable gene list ({e})") from None
    columns = reader.fieldnames or []
    name = next((c for c in ("gene_name", "gene", "genes", "gene_id") if c in columns), None)
    if name is None:
        raise CheckpointError(f"{path}: no gene_name column (columns: {', '.join(columns) or 'none'})")
    short = next((line for r, line in rows if r[name] is None or r.get("isPredicted", "") is None), None)
    if short is not None:
        raise CheckpointError(f"{path}: line {short} has fewer fields than the header")
    rows = [r for r, _ in rows]
    if "isPredicted" in columns:
        rows = [r for r in rows if r["isPredicted"].strip().lower() in ("true", "1", "yes")]
    return [r[name] for r in rows]


# -- reading the file ---------------------------------------------------------------------------------------------
#: Deepest module tree a reference model may have (the real ones are 5 deep).
MAX_DEPTH = 32


def _module_state_dict(record: Record, source: str, prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor]:
    """Flatten a pickled module tree into a state dict, as ``nn.Module.state_dict`` would."""
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{source}: the module tree is nested more than {MAX_DEPTH} levels deep")
    state = record.__dict__
    out: dict[str, torch.Tensor] = {}
    groups = {key: state.get(key) or {} for key in ("_parameters", "_buffers", "_modules")}
    if not all(isinstance(g, Mapping) for g in groups.values()):
        raise CheckpointError(f"{source}: a module's parameters, buffers or children are not a mapping")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in groups[group].items():
            if value is not None and not (group == "_buffers" and isinstance(skip, set) and name in skip):
                out[f"{prefix}{name}"] = value
    for name, child in groups["_modules"].items():
        if isinstance(child, Record):
            out.update(_module_state_dict(child, source, f"{prefix}{name}.", depth + 1))
    return out


def _losses(values: Any, source: str) -> list[float]:
    if values is None or (isinstance(values, (list, tuple)) and not values):
        return []
    try:
        return [float(x) for x in np.asarray(values, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: the stored loss history is not a list of numbers") from None


def _history(record: Record, source: str) -> dict[str, Any] | None:
    train = _losses(record.__dict__.get("training_loss"), source)
    val = _losses(record.__dict__.get("validation_loss"), source)
    if not train and not val:
        return None
    return {"train_loss": train, "val_loss": val, "source": "reference"}


def _family_from_keys(state_dict: Mapping[str, Any], source: str) -> str:
    families = {fam for key in state_dict for prefix, fam in PHI_PREFIXES.items() if key.startswith(prefix)}
    if len(families) != 1:
        keys = ", ".join(list(state_dict)[:3]) or "none"
        raise CheckpointError(
            f"{source}: not a DeepSpot or DeepCell state dict (expected phi_spot.* or phi_cell.* keys; got {keys})"
        )
    return families.pop()


def _read(path: Path) -> dict[str, Any]:
    """Read a reference file into its parts: family, state dict, hyperparameters, scaler, history, context."""
    obj = safe_torch_load(path)
    if isinstance(obj, Record):
        qualname = type(obj).qualname
        family = MODEL_CLASSES.get(qualname)
        if family is None:
            raise CheckpointError(
                f"{path}: holds an unknown model class {qualname}; expected one of: {', '.join(MODEL_CLASSES)}"
            )
        hparams = obj.__dict__.get("_hparams")
        hparams = dict(hparams) if isinstance(hparams, Mapping) else None
        forward = obj.__dict__.get("_forward_fn")
        return {
            "family": family,
            "state_dict": _module_state_dict(obj, str(path)),
            "hparams": hparams,
            # The model's own scaler is the one its inverse_transform uses; the hyperparameters hold the same object.
            "scaler": obj.__dict__.get("scaler", (hparams or {}).get("scaler")),
            "history": _history(obj, str(path)),
            # The bound forward function is what the reference really runs, whatever the hyperparameters say.
            "context": forward.name[len("_forward_") :][:64] if isinstance(forward, BoundMethod) else None,
        }
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # a Lightning checkpoint
        hparams = obj.get("hyper_parameters")
        state_dict = dict(obj["state_dict"])
        hparams = dict(hparams) if isinstance(hparams, Mapping) else None
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, hparams = dict(obj), None
    else:
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a reference model, a Lightning checkpoint or a state dict"
        )
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entry {str(bad[0])[:64]!r} is not a named tensor")
    return {
        "family": _family_from_keys(state_dict, str(path)),
        "state_dict": state_dict,
        "hparams": hparams,
        "scaler": (hparams or {}).get("scaler"),
        "history": None,
        "context": None,
    }


# -- hyperparameters -> our constructor ---------------------------------------------------------------------------
def scaler_from_reference(obj: Any, source: str = "file") -> Scaler | None:
    """Convert the reference's scaler (a pickled scikit-learn scaler record, a dict, or text) to a :class:`Scaler`.

    A ``StandardScaler`` gives ``pred * scale_ + mean_`` and a ``RobustScaler`` ``pred * scale_ + center_``, each
    term only where the scaler was fitted with it (``with_mean`` / ``with_std``, ``with_centering`` / ``with_scaling``),
    as scikit-learn's ``inverse_transform`` does. Text (the reference's YAML writes ``StandardScaler()``) and ``None``
    give ``None``.

    Raises:
        CheckpointError: An unsupported or unfitted scaler.
    """
    if obj is None or isinstance(obj, str):
        return None
    if isinstance(obj, Record):
        qualname = type(obj).qualname
        name = qualname.rsplit(".", 1)[-1]
        state = obj.__dict__
        if name == "StandardScaler":
            offset = state.get("mean_") if state.get("with_mean", True) else None
            scale = state.get("scale_") if state.get("with_std", True) else None
            kind = "standard"
        elif name == "RobustScaler":
            offset = state.get("center_") if state.get("with_centering", True) else None
            scale = state.get("scale_") if state.get("with_scaling", True) else None
            kind = "robust"
        else:
            raise CheckpointError(f"{source}: unsupported scaler {qualname} (StandardScaler or RobustScaler)")
        if offset is None and scale is None and "n_features_in_" not in state:
            raise CheckpointError(f"{source}: the {name} was never fitted (it has no mean_/center_ or scale_)")
        for what, values in (("offset", offset), ("scale", scale)):
            if values is not None and not (
                isinstance(values, np.ndarray) and values.dtype.kind in "iuf" and np.isfinite(values).all()
            ):
                raise CheckpointError(f"{source}: the {name}'s {what} is not an array of finite numbers")
        return Scaler(kind, offset, scale)
    try:
        return Scaler.from_object(obj)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def model_config(family: str, hparams: Mapping[str, Any], context: str | None, source: str) -> dict[str, Any]:
    """Our constructor arguments from the reference's hyperparameters.

    Keys that are not constructor arguments are dropped; ``p_phi``, ``p_rho``, ``n_ensemble_phi`` and
    ``n_ensemble_rho`` stored as 0 become ``None``, because the reference reads them with ``x or default``.

    Raises:
        CheckpointError: ``input_size`` or ``output_size`` is missing.
    """
    cls = model_class(family)
    names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "scaler")]
    config = {k: hparams[k] for k in names if k in hparams}
    missing = [k for k in ("input_size", "output_size") if config.get(k) is None]
    if missing:
        raise CheckpointError(
            f"{source}: missing hyperparameters {', '.join(missing)}; pass the reference's YAML with "
            f"{option('hparams')}"
        )
    for key in _OR_DEFAULT:
        if isinstance(config.get(key), (int, float)) and not config[key]:
            config[key] = None
    if context is not None:
        config[f"{family}_context"] = context
    return config


def import_reference(
    path: str | Path,
    hparams: str | Path | Mapping[str, Any] | None = None,
    genes: str | Path | Sequence[str] | None = None,
):
    """Import a model trained by the reference code, in eval mode.

    Args:
        path: A ``torch.save(model)`` pickle (``.pkl``), a Lightning checkpoint (``.ckpt``) or a state dict (``.pt``).
        hparams: A YAML file or a dict of hyperparameters; it overrides the file's own. Without it, a file that holds
            no hyperparameters (a plain state dict) uses the YAML found beside it by :func:`find_hparams`.
        genes: Gene names of the outputs: a list, a text file or the reference's gene CSV (see :func:`read_genes`).

    Returns:
        A :class:`~deepspot.spot.DeepSpot` or :class:`~deepspot.cell.DeepCell` whose outputs equal the reference's.

    Raises:
        CheckpointError: The file is unreadable or refused, holds an unknown model, lacks hyperparameters, or its
            weights disagree with them. Every message names the file.
    """
    path = Path(path)
    source = str(path)
    parts = _read(path)
    found = parts["hparams"]
    scaler_obj = parts["scaler"]
    if hparams is not None:
        override = load_hparams(hparams)
        # A textual scaler ("StandardScaler()") in a YAML must not hide the fitted one stored in the file.
        given = override.pop("scaler", None)
        if given is not None and not isinstance(given, str):
            scaler_obj = given
        found = {**(found or {}), **override}
    elif found is None:
        beside = find_hparams(path)
        if beside is None:
            raise CheckpointError(
                f"{source}: holds no hyperparameters and no YAML was found beside it; pass one with "
                f"{option('hparams')}"
            )
        found = load_hparams(beside)
        scaler_obj = found.get("scaler")
    scaler = scaler_from_reference(scaler_obj, source)
    config = model_config(parts["family"], found, parts["context"], source)
    try:
        mode = get_mode(parts["family"], config.get(f"{parts['family']}_context", _default_context(parts["family"])))
        meta = {
            "family": parts["family"],
            "mode": mode.name,
            "config": config,
            "scaler": None if scaler is None else scaler.to_dict(),
            "genes": None if genes is None else read_genes(genes),
            "history": parts["history"],
        }
        return from_parts(meta, parts["state_dict"], source=source)
    except CheckpointError:
        raise
    except DeepSpotError as e:  # an invalid constructor argument in the hyperparameters
        raise CheckpointError(f"{source}: {e}") from None


def _default_context(family: str) -> str:
    return inspect.signature(model_class(family).__init__).parameters[f"{family}_context"].default


__all__ = [
    "find_hparams",
    "import_reference",
    "load_hparams",
    "model_config",
    "read_genes",
    "scaler_from_reference",
]
