"""A Triton Inference Server model repository for an exported model, served by Triton's onnxruntime backend.

:func:`write_triton_repository` writes ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx``. The configuration
has ``max_batch_size``, the inputs and outputs without the batch axis (``-1`` for a bag axis), dynamic batching with
preferred batch sizes, an instance group, warm-up requests at the model's real shapes, the model's metadata in
``parameters``, and on request the TensorRT execution accelerator (fp16, engine and timing caches, the
optimisation profile). Before anything is written the text is parsed with Triton's own model-configuration schema
(``model_config_pb2`` from the ``tritonclient`` package) and every name, type and dimension is checked against the
ONNX graph; a repository that fails either check is never written.

Torch-free: ``deepspot triton MODEL.onnx REPO`` runs on a serving install (with ``deepspot[triton]``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, CheckpointError, ConfigError, advice, option, option_value
from ..fileio import temporary_folder

KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
# Bag axes: the reference's bags for warm-up (9 sub-spots, 6 neighbours), and the TensorRT profile's range (the
# runtime's default range; 44-neighbour Xenium bags fit).
WARMUP_BAGS = {"subspot": 9, "neighbors": 6}
BAG_RANGE = (1, 16, 64)
# The TensorRT accelerator keys that Triton's onnxruntime backend accepts (it refuses any other at load time).
TRT_KEYS = frozenset(
    {
        "precision_mode",
        "max_workspace_size_bytes",
        "trt_engine_cache_enable",
        "trt_engine_cache_path",
        "trt_timing_cache_enable",
        "trt_timing_cache_path",
        "trt_profile_min_shapes",
        "trt_profile_opt_shapes",
        "trt_profile_max_shapes",
    }
)
MAX_BATCH_LIMIT = 1 << 16
TRITON_INSTALL = "pip install 'deepspot[triton]'"


@dataclass
class TritonRepository:
    """What :func:`write_triton_repository` wrote.

    Attributes:
        repo: The model repository.
        name: The model's name in it.
        config: ``REPO/NAME/config.pbtxt``.
        model: ``REPO/NAME/1/model.onnx``.
        text: The configuration's text.
    """

    repo: Path
    name: str
    config: Path
    model: Path
    text: str


def model_config_schema():
    """Triton's ``ModelConfig`` message class (``tritonclient``), or an error that says what to install."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise BackendUnavailableError(
            f"validating a Triton model configuration needs Triton's schema from tritonclient: {TRITON_INSTALL}"
        ) from None
    return model_config_pb2


def _dims(values) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def _quote(text: str) -> str:
    # A protobuf text-format string literal: JSON's escapes of quotes, backslashes and newlines are ones it reads.
    return json.dumps(str(text), ensure_ascii=False)


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 64 (or less) up to ``max_batch``, and ``max_batch`` itself: full batches run at the GEMM
    rate, and the dynamic batcher waits for one only briefly."""
    sizes = [s for s in (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536) if s < max_batch]
    return sorted(set(sizes[-3:] + [max_batch]))


def _graph(onnx_path: Path):
    from .info import model_info

    per_item = advice("deepspot.export.export_onnx", "deepspot export --layout dense")
    if onnx_path.is_dir():
        raise ConfigError(
            f"{onnx_path}: an indexed export (encoder + head) is not served this way: its head gathers neighbours "
            "from a whole slide's embedding table, which a Triton request does not carry; serve the per-item graph "
            f"({per_item})"
        )
    if onnx_path.suffix.lower() != ".onnx":
        raise ConfigError(f"{onnx_path}: Triton's onnxruntime backend serves an .onnx file "
                          f"({advice('deepspot.export.export_onnx', 'deepspot export')})")  # fmt: skip
    graph = model_info(onnx_path, check_weights=True)
    meta = graph.metadata
    if meta.get("layout") == "indexed":
        raise ConfigError(
            f"{onnx_path}: the {meta.get('role', 'graph')} of an indexed export is not served this way: the head "
            "gathers neighbours from a whole slide's embedding table, which a Triton request does not carry; serve "
            f"the per-item graph ({per_item})"
        )
    return graph


def _io_dims(tensor, where: str) -> list[int]:
    """Dimensions without the batch axis: fixed sizes as they are, dynamic (bag) axes as -1."""
    if not tensor.shape or isinstance(tensor.shape[0], int):
        raise ConfigError(
            f"{where}: {tensor.name!r} has no dynamic batch axis (shape {tensor.shape}); Triton's batching needs one"
        )
    if tensor.dtype not in TRITON_TYPES:
        raise ConfigError(f"{where}: {tensor.name!r} has element type {tensor.dtype}, which Triton is not given here")
    return [d if isinstance(d, int) else -1 for d in tensor.shape[1:]]


def _warm_dims(tensor) -> list[int]:
    return [d if isinstance(d, int) else WARMUP_BAGS.get(tensor.name, BAG_RANGE[1]) for d in tensor.shape[1:]]


def _profile(inputs, max_batch: int, opt_batch: int) -> dict[str, str]:
    def shapes(batch: int, bag) -> str:
        return ",".join(
            f"{t.name}:"
            + "x".join(str(v) for v in [batch] + [d if isinstance(d, int) else bag(t.name) for d in t.shape[1:]])
            for t in inputs
        )

    lo, opt, hi = BAG_RANGE
    return {
        "trt_profile_min_shapes": shapes(1, lambda name: lo),
        "trt_profile_opt_shapes": shapes(opt_batch, lambda name: WARMUP_BAGS.get(name, opt)),  # as in the warm-up
        "trt_profile_max_shapes": shapes(max_batch, lambda name: hi),
    }


def triton_config_text(
    onnx_path: str | Path,
    name: str,
    max_batch: int = 256,
    instances: int = 1,
    kind: str = "gpu",
    tensorrt: bool = False,
    fp16: bool = False,
    cache_dir: str = "/tmp/deepspot-trt-cache",
    queue_delay_us: int = 500,
    graph: Any = None,
) -> str:
    """The ``config.pbtxt`` text for an exported model (not yet validated: :func:`validate_config` does that)."""
    onnx_path = Path(onnx_path)
    graph = graph if graph is not None else _graph(onnx_path)
    where = str(onnx_path)
    preferred = preferred_batch_sizes(max_batch)
    lines = [f"name: {_quote(name)}", 'backend: "onnxruntime"', f"max_batch_size: {max_batch}", "input ["]
    lines.append(",\n".join(
        f"  {{ name: {_quote(t.name)} data_type: {TRITON_TYPES[t.dtype]} dims: {_dims(_io_dims(t, where))} }}"
        for t in graph.inputs
    ))  # fmt: skip
    lines += ["]", "output ["]
    lines.append(",\n".join(
        f"  {{ name: {_quote(t.name)} data_type: {TRITON_TYPES[t.dtype]} dims: {_dims(_io_dims(t, where))} }}"
        for t in graph.outputs
    ))  # fmt: skip
    lines += [
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(preferred)}",
        f"  max_queue_delay_microseconds: {queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {instances} kind: {KINDS[kind]} }} ]",
        "model_warmup [",
        "  {",
        f'    name: "random batch of {preferred[-1]}"',
        f"    batch_size: {preferred[-1]}",
    ]
    for t in graph.inputs:
        lines.append(
            f"    inputs {{ key: {_quote(t.name)} value: {{ data_type: {TRITON_TYPES[t.dtype]} "
            f"dims: {_dims(_warm_dims(t))} random_data: true }} }}"
        )
    lines += ["  }", "]"]
    if tensorrt:
        params = {
            "precision_mode": "FP16" if fp16 else "FP32",
            "max_workspace_size_bytes": str(4 << 30),
            "trt_engine_cache_enable": "true",
            "trt_engine_cache_path": f"{cache_dir}/{name}",
            "trt_timing_cache_enable": "true",
            "trt_timing_cache_path": f"{cache_dir}/{name}",
            **_profile(graph.inputs, max_batch, preferred[-1]),
        }
        lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator : [ {",
                  '      name : "tensorrt"']  # fmt: skip
        lines += [f"      parameters {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in params.items()]
        lines += ["    } ]", "  }", "}"]
    for key, value in _metadata_parameters(graph.metadata).items():
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def _metadata_parameters(meta: dict[str, Any]) -> dict[str, str]:
    """The export's metadata as ``deepspot.KEY`` string parameters (JSON for structured values)."""
    return {f"deepspot.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def validate_config(text: str, graph: Any, where: str = "config.pbtxt"):
    """Parse ``text`` with Triton's schema and check it against the ONNX graph; return the parsed message.

    Raises:
        ConfigError: The text does not parse as a ``ModelConfig``, or a name, type or dimension differs from the
            graph (first problem named).
    """
    from google.protobuf import text_format

    pb2 = model_config_schema()
    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ConfigError(f"{where}: not a valid Triton model configuration ({e})") from None
    if config.backend != "onnxruntime" or config.max_batch_size < 1:
        raise ConfigError(f"{where}: needs backend onnxruntime and max_batch_size >= 1")
    dtype_name = {v: k for k, v in TRITON_TYPES.items()}

    def check(kind: str, declared, tensors) -> None:
        graph_names = [t.name for t in tensors]
        names = [d.name for d in declared]
        if names != graph_names:
            raise ConfigError(f"{where}: {kind}s {names} differ from the ONNX graph's {graph_names}")
        for d, t in zip(declared, tensors):
            dtype = dtype_name.get(pb2.DataType.Name(d.data_type))
            if dtype != t.dtype:
                declared_type = pb2.DataType.Name(d.data_type)
                raise ConfigError(f"{where}: {kind} {d.name!r} is {declared_type}, the graph's {t.dtype}")
            want = _io_dims(t, where)
            if list(d.dims) != want:
                raise ConfigError(f"{where}: {kind} {d.name!r} has dims {list(d.dims)}, the graph's are {want}")

    check("input", config.input, graph.inputs)
    check("output", config.output, graph.outputs)
    preferred = list(config.dynamic_batching.preferred_batch_size)
    if not preferred or any(not 1 <= p <= config.max_batch_size for p in preferred):
        raise ConfigError(f"{where}: preferred batch sizes {preferred} must lie in 1..{config.max_batch_size}")
    inputs = {t.name: t for t in graph.inputs}
    for warm in config.model_warmup:
        if set(warm.inputs) != set(inputs) or not 1 <= warm.batch_size <= config.max_batch_size:
            raise ConfigError(f"{where}: warm-up {warm.name!r} must feed every input at a batch within max_batch_size")
        for key, value in warm.inputs.items():
            t = inputs[key]
            fixed = [(i, d) for i, d in enumerate(t.shape[1:]) if isinstance(d, int)]
            if len(value.dims) != len(t.shape) - 1 or any(value.dims[i] != d for i, d in fixed):
                raise ConfigError(f"{where}: warm-up input {key!r} has dims {list(value.dims)}, the graph {t.shape}")
    for accel in config.optimization.execution_accelerators.gpu_execution_accelerator:
        unknown = sorted(set(accel.parameters) - TRT_KEYS) if accel.name == "tensorrt" else []
        if unknown:
            raise ConfigError(f"{where}: the TensorRT accelerator does not take {unknown[0]!r}")
        for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
            if key in accel.parameters:
                shaped = dict(part.split(":", 1) for part in accel.parameters[key].split(","))
                if set(shaped) != set(inputs):
                    raise ConfigError(f"{where}: {key} names {sorted(shaped)}, the graph's inputs are {sorted(inputs)}")
                for n, dims in shaped.items():
                    values = [int(v) for v in dims.split("x")]
                    t = inputs[n]
                    if len(values) != len(t.shape) or any(
                        isinstance(d, int) and v != d for v, d in zip(values[1:], t.shape[1:])
                    ) or values[0] > config.max_batch_size:  # fmt: skip
                        raise ConfigError(f"{where}: {key} gives {n} the shape {dims}, the graph {t.shape}")
    return config


def check_triton_options(name: str | None = None, max_batch: int = 256, instances: int = 1, kind: str = "gpu",
                         tensorrt: bool = False, fp16: bool = False, version: int = 1) -> None:  # fmt: skip
    """Refuse bad repository options, and a missing ``tritonclient``, before any work.

    Raises:
        ConfigError: An option out of range or options that do not go together.
        BackendUnavailableError: ``tritonclient`` (Triton's schema) is not installed.
    """
    if name is not None:
        check_name(name)
    if kind not in KINDS:
        raise ConfigError(f"unknown instance kind {kind!r}; expected gpu or cpu")
    for value, arg, top in ((max_batch, "max_batch", MAX_BATCH_LIMIT), (instances, "instances", 64)):
        if not 1 <= value <= top:
            raise ConfigError(f"{option(arg)} must lie in 1..{top}, got {value}")
    if version < 1:
        raise ConfigError(f"the model version must be at least 1, got {version}")
    if fp16 and not tensorrt:
        raise ConfigError(f"{option('fp16')} applies to {option('tensorrt')} (onnxruntime's CUDA provider runs the "
                          "graph as exported)")  # fmt: skip
    if tensorrt and kind != "gpu":
        raise ConfigError(f"{option('tensorrt')} needs GPU instances ({option_value('kind', 'gpu')})")
    model_config_schema()  # without Triton's schema nothing can be validated


def check_triton_repo(repo: str | Path) -> Path:
    """Refuse, before any work, a repository path that is a file, or a new one whose parent folder is missing
    (deepspot makes the repository folder, never its parents: a typo fails at once).

    Raises:
        ConfigError: Naming the path.
    """
    from ..fileio import check_output_folder

    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"{repo}: exists and is not a folder; a Triton model repository is a folder")
    if not repo.exists():
        check_output_folder(repo, "Triton repository")
    return repo


def check_name(name: str) -> str:
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.strip() != name:
        raise ConfigError(f"invalid Triton model name {name!r}: a plain folder name, without slashes")
    return name


def write_triton_repository(
    onnx_path: str | Path,
    repo: str | Path,
    name: str | None = None,
    max_batch: int = 256,
    instances: int = 1,
    kind: str = "gpu",
    tensorrt: bool = False,
    fp16: bool = False,
    version: int = 1,
) -> TritonRepository:
    """Write ``repo/name/config.pbtxt`` and ``repo/name/<version>/model.onnx`` for an exported (per-item) model.

    Args:
        onnx_path: The ``.onnx`` file (``deepspot export``).
        repo: The model repository (created if missing; other models in it are left alone).
        name: The model's name (default: the file's stem).
        max_batch: ``max_batch_size``: the largest batch the dynamic batcher forms.
        instances: Model instances per device (``instance_group`` count).
        kind: ``gpu`` or ``cpu`` instances.
        tensorrt: Add the TensorRT execution accelerator (GPU instances only).
        fp16: TensorRT runs in fp16 (with ``tensorrt``).
        version: The model version folder.

    Raises:
        ConfigError: Bad options, an indexed-layout graph, or a configuration that fails validation.
        CheckpointError: The ONNX file is missing or unreadable.
        BackendUnavailableError: ``tritonclient`` (Triton's schema) is not installed.
    """
    onnx_path = Path(onnx_path)
    check_triton_options(name, max_batch, instances, kind, tensorrt, fp16, version)
    if not onnx_path.exists():
        raise CheckpointError(f"{onnx_path}: no such ONNX file")
    graph = _graph(onnx_path)
    name = check_name(name or onnx_path.stem)
    text = triton_config_text(onnx_path, name, max_batch, instances, kind, tensorrt, fp16, graph=graph)
    validate_config(text, graph, where=f"{name}/config.pbtxt")

    repo = check_triton_repo(repo)
    repo.mkdir(exist_ok=True)
    target = repo / name
    # Written into a hidden sibling, then renamed: Triton polling the repository never sees half a model.
    staging = temporary_folder(target)
    try:
        (staging / str(version)).mkdir()
        shutil.copyfile(onnx_path, staging / str(version) / "model.onnx")
        (staging / "config.pbtxt").write_text(text)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=repo))
            target.rename(old / name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return TritonRepository(repo, name, target / "config.pbtxt", target / str(version) / "model.onnx", text)
