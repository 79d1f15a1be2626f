"""What an exported ONNX file holds: inputs and outputs with their dynamic axes, opset, and deepspot's metadata.

:func:`read_model_metadata` is what a runtime needs (family, mode, genes, scaler, precision) without the checkpoint;
:func:`model_info` adds the graph's signature for ``deepspot info``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .metadata import METADATA_FORMAT, metadata_value

_ELEM_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32"}


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output.

    Attributes:
        name: Tensor name.
        dtype: Element type (``float32``).
        shape: Dimensions: an int where fixed, the axis name (``batch``) where dynamic.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """``{axis: name}`` of the dynamic axes."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        dyn = ", ".join(f"{i}: {n}" for i, n in self.dynamic_axes.items()) or "none"
        return f"{self.name}: {self.dtype} ({dims})  dynamic axes: {dyn}"


@dataclass
class ModelInfo:
    """The signature and metadata of an ONNX file.

    Attributes:
        path: The file.
        inputs: Graph inputs in order.
        outputs: Graph outputs in order.
        opset: Opset of the default ONNX domain.
        producer: ``producer_name producer_version``.
        metadata: Decoded deepspot metadata (JSON values parsed); raw strings for foreign keys.
    """

    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    opset: int | None
    producer: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_deepspot(self) -> bool:
        return self.metadata.get("format") == METADATA_FORMAT

    def format(self) -> str:
        """Plain text for ``deepspot info``: inputs, outputs, then one metadata key per line."""
        lines = [f"{self.path}", f"  opset {self.opset}, produced by {self.producer or 'unknown'}", "inputs:"]
        lines += [f"  {t.describe()}" for t in self.inputs]
        lines.append("outputs:")
        lines += [f"  {t.describe()}" for t in self.outputs]
        lines.append("metadata:" if self.metadata else "metadata: none (not exported by deepspot)")
        for key, value in self.metadata.items():
            lines.append(f"  {key}: {_short(key, value)}")
        return "\n".join(lines)


def _short(key: str, value: Any) -> str:
    # Gene lists and scaler arrays run to thousands of numbers; show their size and the first few entries.
    if key == "genes" and isinstance(value, list):
        head = ", ".join(value[:5]) + (", ..." if len(value) > 5 else "")
        return f"{len(value)} genes [{head}]"
    if key == "scaler" and isinstance(value, dict):
        sizes = {k: (len(v) if isinstance(v, list) else v) for k, v in value.items() if k != "kind"}
        return f"{value.get('kind')} ({', '.join(f'{k}: {n} values' for k, n in sizes.items())})"
    return value if isinstance(value, str) else json.dumps(value)


def _load(path: str | os.PathLike):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        onnx_model = onnx.load(str(path), load_external_data=False)
        # Random bytes sometimes decode as a (nonsense) protobuf message; the checker tells a model from that.
        onnx.checker.check_model(onnx_model)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors have no common base
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    return onnx_model


def decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    """Parse deepspot's JSON-valued ``metadata_props``; other keys stay strings."""
    decoded = {}
    for key in props:
        try:
            decoded[key] = metadata_value(props, key)
        except (ValueError, json.JSONDecodeError):
            decoded[key] = props[key]
    return decoded


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded ``metadata_props`` of an ONNX file: family, mode, config, genes, scaler, precision, ...

    Values written as JSON (``config``, ``genes``, ``scaler``, ``scaler_folded``, ``optimize``) come back as Python
    objects, ``opset`` and ``format_version`` as ints.

    Raises:
        CheckpointError: The file is missing or not an ONNX model.
    """
    onnx_model = _load(path)
    return decode_metadata({p.key: p.value for p in onnx_model.metadata_props})


def _tensor_info(value_info) -> TensorInfo:
    t = value_info.type.tensor_type
    dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
    return TensorInfo(value_info.name, _ELEM_TYPES.get(t.elem_type, str(t.elem_type)), dims)


def check_finite_initializers(graph, source: str) -> None:
    """Raise if a floating-point weight of an ONNX graph holds NaN or infinity (every prediction would be NaN)."""
    from onnx import TensorProto, numpy_helper

    floating = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    for init in graph.initializer:
        if init.data_type in floating and init.data_location != TensorProto.EXTERNAL:
            values = numpy_helper.to_array(init)
            if not np.isfinite(values.astype(np.float32, copy=False)).all():
                raise CheckpointError(f"{source}: weight {init.name[:80]!r} holds NaN or infinite values")


def model_info(path: str | os.PathLike, check_weights: bool = False) -> ModelInfo:
    """Read an ONNX file's inputs, outputs (with dynamic axes), opset and metadata.

    Args:
        path: The ONNX file.
        check_weights: Also refuse a graph whose floating-point weights hold NaN or infinity.

    Raises:
        CheckpointError: The file is missing or not an ONNX model (or holds non-finite weights).
    """
    onnx_model = _load(path)
    if check_weights:
        check_finite_initializers(onnx_model.graph, str(path))
    initializers = {init.name for init in onnx_model.graph.initializer}
    opset = next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), None)
    producer = f"{onnx_model.producer_name} {onnx_model.producer_version}".strip()
    return ModelInfo(
        path=Path(path),
        inputs=[_tensor_info(v) for v in onnx_model.graph.input if v.name not in initializers],
        outputs=[_tensor_info(v) for v in onnx_model.graph.output],
        opset=opset,
        producer=producer,
        metadata=decode_metadata({p.key: p.value for p in onnx_model.metadata_props}),
    )
