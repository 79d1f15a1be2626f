"""A model from its metadata and its weights, checked before anything is allocated.

Both a deepspot checkpoint (:mod:`deepspot.checkpoint`) and a reference file (:mod:`deepspot.importer`) end here.
Either may come from anyone, so every claim in it is checked against what the file really holds, in an order that
never lets a small file ask for much memory:

1. the metadata's types: known family, constructor arguments of the types the constructor takes, gene names as a
   list of strings, scaler arrays as finite numbers;
2. the ensemble sizes against the number of tensors present (each network has several);
3. the model's parameter shapes, computed on PyTorch's ``meta`` device (no memory), against the weights' shapes;
4. only then the model itself, whose size now equals that of the weights in the file, and finite weights.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch

from .base import building_from_weights
from .errors import CheckpointError, DeepSpotError
from .factory import model_class
from .metacheck import check_genes, check_scaler
from .scaler import Scaler

#: Longest string a constructor argument may be (a loss, a mode or a pooling name).
_MAX_TEXT = 64


def _argument_kinds(cls: type) -> dict[str, tuple[str, bool]]:
    """``{name: (kind, optional)}`` of the constructor's arguments, from its annotations (``int``, ``float | None``)."""
    kinds = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "scaler"):
            continue
        note = str(param.annotation)
        kind = next((k for k in ("int", "float", "str") if note.startswith(k)), "str")
        kinds[name] = (kind, "None" in note or param.default is None)
    return kinds


def check_config(cls: type, config: Any, source: str) -> dict[str, Any]:
    """Constructor arguments of ``cls`` from untrusted metadata: known names, right types, finite numbers.

    Raises:
        CheckpointError: An unknown argument or a value of the wrong type, naming both.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: the hyperparameters are a {type(config).__name__}, not a mapping")
    kinds = _argument_kinds(cls)
    out: dict[str, Any] = {}
    for name, value in config.items():
        if name not in kinds:
            raise CheckpointError(f"{source}: unknown hyperparameter {str(name)[:_MAX_TEXT]!r}")
        kind, optional = kinds[name]
        if value is None and optional:
            out[name] = None
            continue
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a NumPy or torch scalar
            value = value.item()
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            "str": isinstance(value, str) and len(value) <= _MAX_TEXT,
        }[kind]
        if not ok:
            shown = repr(value) if isinstance(value, (int, float, str, bool)) else type(value).__name__
            raise CheckpointError(f"{source}: hyperparameter {name} must be {'an' if kind == 'int' else 'a'} {kind}, "
                                  f"got {shown[:_MAX_TEXT]}")
        out[name] = value
    return out


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def check_weights(config: dict[str, Any], family: str, shapes: Mapping[str, Any], source: str) -> None:
    """Compare the parameter shapes that ``config`` gives with ``shapes`` (tensors, or shapes), allocating nothing.

    Raises:
        CheckpointError: An ensemble larger than the file could hold, a missing or unexpected tensor, or a shape that
            differs, naming the first.
    """
    cls = model_class(family)
    for name in ("n_ensemble", "n_ensemble_phi", "n_ensemble_rho"):
        count = config.get(name)
        if isinstance(count, int) and count > len(shapes):
            raise CheckpointError(f"{source}: {name}={count}, but the file holds only {len(shapes)} tensors")
    try:
        with torch.device("meta"), building_from_weights():
            expected = {k: tuple(v.shape) for k, v in cls(**config).state_dict().items()}
    except DeepSpotError as e:
        raise CheckpointError(f"{source}: {e}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{source}: invalid hyperparameters ({str(e).splitlines()[0][:200]})") from None
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{source}: state dict does not match the hyperparameters: {what}")
    for k, shape in expected.items():
        if _shape(shapes[k]) != shape:
            raise CheckpointError(f"{source}: {k} has shape {_shape(shapes[k])}, the hyperparameters give {shape}")


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise if a floating-point weight holds a NaN or an infinity (it would make every prediction NaN)."""
    for k, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: weight {k} holds NaN or infinite values")


def check_metadata(meta: Any, source: str) -> tuple[str, dict[str, Any], Scaler | None, list[str] | None]:
    """The family, constructor arguments, scaler and gene names of untrusted metadata, each checked."""
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{source}: the metadata is not a mapping")
    family = meta.get("family")
    if family not in ("spot", "cell"):
        raise CheckpointError(f"{source}: unknown model family {str(family)[:_MAX_TEXT]!r} (spot or cell)")
    config = check_config(model_class(family), meta.get("config"), source)
    return family, config, check_scaler(meta.get("scaler"), source), check_genes(meta.get("genes"), source)


def shapes_of(meta: Any, shapes: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Check metadata against the weights' shapes alone (before the weights are read)."""
    family, config, _, _ = check_metadata(meta, source)
    check_weights(config, family, shapes, source)


def from_parts(meta: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"):
    """Rebuild a model, in eval mode, from its metadata and state dict, checking everything first (see above).

    Raises:
        CheckpointError: The metadata or the weights are inconsistent, of the wrong type, or not finite.
    """
    family, config, scaler, genes = check_metadata(meta, source)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: state dict entry {str(bad[0])[:_MAX_TEXT]!r} is not a tensor")
    check_weights(config, family, state_dict, source)
    check_finite(state_dict, source)
    try:
        with building_from_weights():  # the caller's seeds, cuDNN flags and environment stay as they were
            model = model_class(family)(**config, scaler=scaler)
    except DeepSpotError as e:
        raise CheckpointError(f"{source}: {e}") from None
    model.load_state_dict({k: t.to(torch.float32) for k, t in state_dict.items()})
    model.genes = genes
    history = meta.get("history")
    model.history = history if isinstance(history, Mapping) else None
    if model.genes is not None and len(model.genes) != model.output_size:
        raise CheckpointError(f"{source}: {len(model.genes)} gene names for {model.output_size} outputs")
    if model.scaler is not None and model.scaler.n_features not in (None, model.output_size):
        raise CheckpointError(f"{source}: the scaler has {model.scaler.n_features} genes, the model {model.output_size}")
    model.eval()
    return model


__all__ = ["check_config", "check_finite", "check_metadata", "check_weights", "from_parts", "shapes_of"]
