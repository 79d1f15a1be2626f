"""What a model file is and what it says about itself: checkpoint, ONNX graph or TensorRT plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..scaler import Scaler
from .base import ModelInfo, TensorSpec

CHECKPOINT_SUFFIXES = (".safetensors", ".pkl", ".ckpt", ".pt", ".pth", ".bin")
ONNX_SUFFIXES = (".onnx",)
PLAN_SUFFIXES = (".plan", ".engine")


def artifact_kind(model: Any) -> str:
    """``model`` (an in-memory model or a checkpoint), ``onnx`` or ``plan``.

    Raises:
        CheckpointError: A path with a suffix that is none of these.
    """
    if not isinstance(model, (str, Path)):
        return "model"
    suffix = Path(model).suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return "model"
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in PLAN_SUFFIXES:
        return "plan"
    known = ", ".join(CHECKPOINT_SUFFIXES + ONNX_SUFFIXES + PLAN_SUFFIXES)
    raise CheckpointError(f"{model}: unknown model file type {suffix or '(none)'}; expected one of {known}")


def info_from_onnx_metadata(meta: dict[str, Any], source: str = "") -> ModelInfo | None:
    """:class:`ModelInfo` from the decoded ``metadata_props`` of a deepspot export (``None`` for a foreign graph)."""
    if meta.get("format") != "deepspot-onnx":
        return None
    try:
        config = dict(meta["config"])
        scaler = meta.get("scaler")
        return ModelInfo(
            family=meta["family"],
            mode=meta["mode"],
            input_size=int(config["input_size"]),
            output_size=int(config["output_size"]),
            genes=meta.get("genes"),
            scaler=None if not scaler else Scaler.from_dict(scaler),
            fold_scaler=bool(meta.get("scaler_folded", False)),
            precision=str(meta.get("precision", "fp32")),
            config=config,
            source=source,
            layout=str(meta.get("layout", "dense")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: incomplete deepspot metadata ({type(e).__name__}: {e})") from None


def read_onnx(path: str | Path) -> tuple[ModelInfo | None, dict[str, TensorSpec]]:
    """An ONNX file's model metadata (``None`` if not exported by deepspot) and its input specs, without running it.

    Raises:
        CheckpointError: Missing or unreadable file.
    """
    from ..export import model_info

    graph = model_info(path)
    inputs = {t.name: TensorSpec(t.name, tuple(t.shape), t.dtype) for t in graph.inputs}
    return info_from_onnx_metadata(graph.metadata, source=str(path)), inputs
