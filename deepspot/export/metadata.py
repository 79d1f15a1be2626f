"""What an export writes that a runtime reads: the metadata format, its decoding, and the indexed layout's names.

Torch-free, so that the runtime (and ``deepspot info`` / ``deepspot triton``) reads exports without PyTorch; the
exporter and the indexed export import these from here.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_OPSET = 17  # the lowest the project allows, so the widest reach (ONNX Runtime >= 1.13, TensorRT >= 8.6)
METADATA_FORMAT = "deepspot-onnx"
METADATA_VERSION = 1
_JSON_KEYS = frozenset({"config", "genes", "scaler_folded", "scaler", "optimize", "input_names", "pools"})

# The indexed layout: two graphs in one folder, and the names of their tensors.
ENCODER_FILE = "encoder.onnx"
HEAD_FILE = "head.onnx"
ENCODER_INPUT = "tile"
ENCODER_OUTPUT = "embedding"
HEAD_EMBEDDING = "embedding"
HEAD_NEIGHBORS = "neighbor_embeddings"
OUTPUT = "expression"


def indexed_precision(precision: str, table_dtype: str) -> str:
    """The tolerance row of an indexed export: an fp16 table rounds every embedding to fp16, so a graph computed at
    fp32 (or tf32) is held to the fp16 row; bf16 is coarser still and keeps its own."""
    return "fp16" if table_dtype == "fp16" and precision in ("fp32", "tf32") else precision


def metadata_value(metadata: dict[str, str], key: str) -> Any:
    """Decode one ``metadata_props`` value written by the exporter's ``build_metadata`` (JSON where it is JSON)."""
    raw = metadata[key]
    if key in _JSON_KEYS:
        return json.loads(raw)
    if key in ("format_version", "opset"):
        return int(raw)
    return raw


def head_input_names(mode) -> tuple[str, ...]:
    """Inputs of the indexed head graph, in call order: own embedding, sub-spots where the mode has them, neighbours."""
    names = [HEAD_EMBEDDING]
    if "subspot" in mode.input_names:
        names.append("subspot")
    names.append(HEAD_NEIGHBORS)
    return tuple(names)
