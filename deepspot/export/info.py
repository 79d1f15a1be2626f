"""What an exported ONNX file holds: inputs and outputs with their dynamic axes, opset, and deepspot's metadata.

:func:`read_model_metadata` is what a runtime needs (family, mode, genes, scaler, precision) without the checkpoint;
:func:`model_info` adds the graph's signature for ``deepspot info``.
"""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .metadata import ENCODER_FILE, HEAD_FILE, METADATA_FORMAT, metadata_value

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
            lines.append(f"  {key}: {short_value(key, value)}")
        return "\n".join(lines)


def short_value(key: str, value: Any) -> str:
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
    if path.is_dir():
        if (path / HEAD_FILE).is_file():
            raise CheckpointError(f"{path}: an indexed export's folder, not an ONNX file; give {path / ENCODER_FILE} "
                                  f"or {path / HEAD_FILE}")  # fmt: skip
        raise CheckpointError(f"{path}: a folder, not an ONNX file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        onnx_model = onnx.load(str(path), load_external_data=False)
        # Random bytes sometimes decode as a (nonsense) protobuf message; the checker tells a model from that. Given
        # the path, it reads the file itself: twice as fast on a 60 MB graph as serialising the loaded message again.
        onnx.checker.check_model(str(path))
    except Exception as e:  # protobuf's DecodeError and onnx's own errors have no common base
        # onnx's checker says why (an external-data location outside the model's folder, say) on its first line.
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__}{': ' if why else ''}{why})") from None
    return onnx_model


def decode_metadata(props: dict[str, str], source: str = "ONNX metadata") -> dict[str, Any]:
    """Parse deepspot's JSON-valued ``metadata_props``; other keys stay strings.

    Raises:
        CheckpointError: A JSON value nested too deeply (``source`` names the file).
    """
    from ..metacheck import too_deep

    decoded = {}
    for key in props:
        try:
            decoded[key] = metadata_value(props, key)
        except (ValueError, json.JSONDecodeError):
            decoded[key] = props[key]
        except RecursionError:
            raise CheckpointError(f"{source}: corrupt metadata {key[:40]!r} (nested too deeply)") from None
        if too_deep(decoded[key]):
            raise CheckpointError(f"{source}: corrupt metadata {key[:40]!r} (nested too deeply)")
    return decoded


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded ``metadata_props`` of an ONNX file: family, mode, config, genes, scaler, precision, ...

    Values written as JSON (``config``, ``genes``, ``scaler``, ``scaler_folded``, ``optimize``) come back as Python
    objects, ``opset`` and ``format_version`` as ints.

    Raises:
        CheckpointError: The file is missing or not an ONNX model.
    """
    return model_info(path).metadata


def _tensor_info(value_info) -> TensorInfo:
    t = value_info.type.tensor_type
    dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
    return TensorInfo(value_info.name, _ELEM_TYPES.get(t.elem_type, str(t.elem_type)), dims)


def first_nonfinite_initializer(graph) -> str | None:
    """The name of the first floating-point weight of an ONNX graph that holds NaN or infinity, or ``None``."""
    from onnx import TensorProto, numpy_helper

    floating = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    for init in graph.initializer:
        if init.data_type in floating and init.data_location != TensorProto.EXTERNAL:
            values = numpy_helper.to_array(init)
            if not np.isfinite(values.astype(np.float32, copy=False)).all():
                return init.name
    return None


def _raise_nonfinite(name: str | None, source: str) -> None:
    if name is not None:
        raise CheckpointError(f"{source}: weight {name[:80]!r} holds NaN or infinite values")


# What model_info read from recent files, keyed by the file's identity (device, inode, size, modification time): a
# command that opens one graph several times (its metadata, its signature, its runner) parses it once. A file that
# is replaced or rewritten gets a new key.
_CACHE: OrderedDict[tuple, tuple[ModelInfo, str | None]] = OrderedDict()
_CACHE_SIZE = 8


def _file_key(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def model_info(path: str | os.PathLike, check_weights: bool = False) -> ModelInfo:
    """Read an ONNX file's inputs, outputs (with dynamic axes), opset and metadata.

    Args:
        path: The ONNX file.
        check_weights: Also refuse a graph whose floating-point weights hold NaN or infinity.

    Raises:
        CheckpointError: The file is missing or not an ONNX model (or holds non-finite weights).
    """
    path = Path(path)
    key = _file_key(path)
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        info, nonfinite = _CACHE[key]
    else:
        onnx_model = _load(path)
        nonfinite = first_nonfinite_initializer(onnx_model.graph)  # ~15 ms for 60 MB of weights: always, once
        initializers = {init.name for init in onnx_model.graph.initializer}
        opset = next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), None)
        producer = f"{onnx_model.producer_name} {onnx_model.producer_version}".strip()
        info = ModelInfo(
            path=path,
            inputs=[_tensor_info(v) for v in onnx_model.graph.input if v.name not in initializers],
            outputs=[_tensor_info(v) for v in onnx_model.graph.output],
            opset=opset,
            producer=producer,
            metadata=decode_metadata({p.key: p.value for p in onnx_model.metadata_props}, str(path)),
        )
        if key is not None and key == _file_key(path):  # unchanged while it was read
            _CACHE[key] = (info, nonfinite)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    if check_weights:
        _raise_nonfinite(nonfinite, str(path))
    return replace(copy.deepcopy(info), path=path)


def indexed_export_info(folder: str | os.PathLike) -> dict[str, ModelInfo]:
    """What an indexed export's folder holds: ``{"encoder": ModelInfo, "head": ModelInfo}``.

    Raises:
        CheckpointError: Not a folder, or a folder without both graphs (or with one that is not an ONNX model).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder of an indexed export")
    if not any((folder / name).is_file() for name in (ENCODER_FILE, HEAD_FILE)):
        raise CheckpointError(f"{folder}: a folder without {ENCODER_FILE} and {HEAD_FILE}, so neither an ONNX file "
                              "nor an indexed export")  # fmt: skip
    for name in (ENCODER_FILE, HEAD_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name}; an indexed export holds {ENCODER_FILE} and {HEAD_FILE}")
    return {"encoder": model_info(folder / ENCODER_FILE), "head": model_info(folder / HEAD_FILE)}


#: Ops that onnxruntime runs without moving the tensor's bytes (a view, or a shape computation).
_FREE_OPS = {"Reshape", "Flatten", "Unsqueeze", "Squeeze", "Shape", "Constant", "Identity"}


def traffic_per_item(path: str | os.PathLike, batch: int, bags: dict[str, int]) -> float:
    """Bytes of memory an unfused run of the graph reads and writes per item, at ``batch`` items per run: each node
    reads its inputs (weights included, shared by the batch) and writes its outputs; views and shape computations
    are free. On a GPU that fuses nothing (onnxruntime's CUDA provider, for the elementwise median network), memory
    bandwidth over this figure bounds the items per second.

    Raises:
        CheckpointError: Missing or unreadable file, or a graph whose shapes cannot be inferred at these sizes.
    """
    import onnx
    from onnx import shape_inference
    from onnx.helper import tensor_dtype_to_np_dtype

    def nbytes(dims, elem_type: int) -> int:
        return int(np.prod(dims)) * tensor_dtype_to_np_dtype(elem_type).itemsize

    model = _load(path)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                continue
            size = batch if i == 0 else bags.get(value.name, 1)
            dim.ClearField("dim_param")
            dim.dim_value = size
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise CheckpointError(f"{path}: its shapes cannot be inferred at batch {batch} ({e})") from None
    sizes: dict[str, int] = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if all(dims) or not dims:
            sizes[value.name] = nbytes(dims, t.elem_type)
    for init in inferred.graph.initializer:
        sizes[init.name] = nbytes(init.dims, init.data_type)
    total = 0
    for node in inferred.graph.node:
        if node.op_type in _FREE_OPS:
            continue
        for name in (*node.input, *node.output):
            if name and name not in sizes:
                raise CheckpointError(f"{path}: the size of {name!r} cannot be inferred at batch {batch}")
            total += sizes.get(name, 0)
    return total / batch
