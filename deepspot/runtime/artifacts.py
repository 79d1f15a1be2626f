"""What a model file is and what it says about itself: checkpoint, ONNX graph or TensorRT plan."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, advice, folder_hint
from ..metacheck import check_genes, check_scaler, check_size
from .base import ModelInfo, TensorSpec

CHECKPOINT_SUFFIXES = (".safetensors", ".pkl", ".ckpt", ".pt", ".pth", ".bin")
ONNX_SUFFIXES = (".onnx",)
PLAN_SUFFIXES = (".plan", ".engine")


def artifact_kind(model: Any) -> str:
    """``model`` (an in-memory model or a checkpoint), ``onnx`` or ``plan``.

    Raises:
        CheckpointError: A path with a suffix that is none of these.
        TypeError: Neither a path nor a model.
    """
    if not isinstance(model, (str, Path)):
        if not (hasattr(model, "family") and hasattr(model, "mode")):
            raise TypeError(f"expected the path of a model file or a DeepSpot/DeepCell model, not a "
                            f"{type(model).__name__}")  # fmt: skip
        return "model"
    suffix = Path(model).suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return "model"
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in PLAN_SUFFIXES:
        return "plan"
    known = ", ".join(CHECKPOINT_SUFFIXES + ONNX_SUFFIXES + PLAN_SUFFIXES)
    hint = folder_hint(model)
    if hint:
        raise CheckpointError(f"{model}: not a model file{hint}")
    if Path(model).is_dir():
        from ..export.metadata import ENCODER_FILE, HEAD_FILE

        if (Path(model) / ENCODER_FILE).is_file():  # an indexed export's folder missing its other graph
            again = advice("deepspot.export.indexed.export_indexed", "--layout indexed")
            raise CheckpointError(f"{model}: an indexed export's folder without {HEAD_FILE}; an indexed export holds "
                                  f"{ENCODER_FILE} and {HEAD_FILE} (export it again with {again})")  # fmt: skip
        raise CheckpointError(f"{model}: a folder, not a model file; expected a file ending in one of {known}")
    if not Path(model).exists():
        raise CheckpointError(f"{model}: no such model file or folder")
    raise CheckpointError(f"{model}: unknown model file type {suffix or '(none)'}; expected one of {known}")


def checked_info(fields: Any, source: str = "") -> ModelInfo:
    """:class:`ModelInfo` from untrusted fields (an ONNX graph's metadata, a plan's header), each one checked.

    Raises:
        CheckpointError: A missing field, a wrong type, an unknown family or mode, or an absurd size, named.
    """
    from ..modes import get_mode

    if not isinstance(fields, Mapping):
        raise CheckpointError(f"{source}: the model metadata is a {type(fields).__name__}, not a mapping")
    config = fields.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: incomplete deepspot metadata (no config)")
    family, mode = fields.get("family"), fields.get("mode")
    if not isinstance(family, str) or not isinstance(mode, str):
        raise CheckpointError(f"{source}: incomplete deepspot metadata (family and mode must be names)")
    try:
        mode = get_mode(family, mode).name
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    # ONNX metadata holds the sizes in the config; a plan's header (ModelInfo.to_dict) beside it as well.
    input_size = check_size(config.get("input_size", fields.get("input_size")), "input_size", source)
    output_size = check_size(config.get("output_size", fields.get("output_size")), "output_size", source)
    precision, layout = fields.get("precision", "fp32"), fields.get("layout", "dense")
    if precision not in ("fp32", "fp16", "bf16") or layout not in ("dense", "indexed"):
        raise CheckpointError(f"{source}: unknown precision {str(precision)[:16]!r} or layout {str(layout)[:16]!r}")
    return ModelInfo(
        family=family,
        mode=mode,
        input_size=input_size,
        output_size=output_size,
        genes=check_genes(fields.get("genes"), source, output_size),
        scaler=check_scaler(fields.get("scaler"), source, output_size),
        fold_scaler=bool(fields.get("scaler_folded", fields.get("fold_scaler", False))),
        precision=precision,
        config=dict(config),
        source=source,
        layout=layout,
    )


def info_from_onnx_metadata(meta: dict[str, Any], source: str = "") -> ModelInfo | None:
    """:class:`ModelInfo` from the decoded ``metadata_props`` of a deepspot export (``None`` for a foreign graph)."""
    if meta.get("format") != "deepspot-onnx":
        return None
    return checked_info(meta, source)


def read_onnx(path: str | Path) -> tuple[ModelInfo | None, dict[str, TensorSpec]]:
    """An ONNX file's model metadata (``None`` if not exported by deepspot) and its input specs, without running it.

    Raises:
        CheckpointError: Missing or unreadable file.
    """
    from ..export import model_info

    graph = model_info(path, check_weights=True)
    inputs = {t.name: TensorSpec(t.name, tuple(t.shape), t.dtype) for t in graph.inputs}
    return info_from_onnx_metadata(graph.metadata, source=str(path)), inputs
