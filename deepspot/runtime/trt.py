"""The ``tensorrt`` backend: native TensorRT engines built from the ONNX graph, run with the TensorRT Python API.

A ``.plan`` written here is a small header followed by the serialized engine. The header (JSON) says what the
engine was built from and for: the ONNX file's SHA-256, the model's metadata, the GPU's name and compute capability,
the TensorRT version, the precision and the optimisation profile. A TensorRT engine only runs on the GPU
architecture and TensorRT version that built it, so :class:`TrtRunner` checks these before it deserializes
anything and says what differs. ``tensorrt`` is imported lazily; device memory comes from PyTorch's CUDA allocator.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, CheckpointError, ConfigError, advice
from ..fileio import atomic_path
from ._cuda import PinnedPool
from .artifacts import checked_info
from .base import OUTPUT_NAME, Runner, TensorSpec
from .profiles import Profile, derive_profile

MAGIC = b"DEEPSPOT-TRT-PLAN\n"
PLAN_VERSION = 1
INSTALL = "pip install 'deepspot[tensorrt]' (TensorRT 10 and a CUDA build of PyTorch, on an NVIDIA GPU)"


def import_trt():
    """``tensorrt``, or an error that says what to install."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(f"the tensorrt backend needs NVIDIA TensorRT: {INSTALL}") from None
    return tensorrt


def gpu_identity(device_id: int = 0) -> dict[str, Any]:
    """Name and compute capability of a GPU, from PyTorch."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"the tensorrt backend needs an NVIDIA GPU, and PyTorch sees none: {INSTALL}")
    major, minor = torch.cuda.get_device_capability(device_id)
    return {"gpu": torch.cuda.get_device_name(device_id), "compute_capability": f"{major}.{minor}"}


# -- the plan file ------------------------------------------------------------------------------------------------
def write_plan(path: str | Path, engine: bytes, header: Mapping[str, Any]) -> Path:
    """Write ``MAGIC | u64 header length | header JSON | engine`` atomically."""
    blob = json.dumps({"format_version": PLAN_VERSION, **header}, sort_keys=True).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
        f.write(engine)
    return Path(path)


#: Largest plan header read (real ones are a few kilobytes).
MAX_HEADER_BYTES = 1 << 20


def read_plan_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The header of a ``.plan`` and the offset where the engine starts.

    Raises:
        CheckpointError: Missing file, not a plan written by deepspot, or a truncated or malformed header.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such engine file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            build = advice("deepspot.runtime.trt.engine_from_onnx", "`deepspot engine build`")
            raise CheckpointError(f"{path}: not a deepspot TensorRT plan; build one with {build}")
        raw = f.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - len(MAGIC) - 8):
            raise CheckpointError(f"{path}: corrupt plan header (truncated, or a length the file does not hold)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path}: corrupt plan header (not JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("profile"), dict):
        raise CheckpointError(f"{path}: corrupt plan header (not a mapping with a profile)")
    if header.get("format_version") != PLAN_VERSION:
        raise CheckpointError(f"{path}: plan format {str(header.get('format_version'))[:16]!r} is not {PLAN_VERSION}")
    model = header.get("model")
    if model is not None:
        checked_info(model, str(path))
    _profile(header, path)
    return header, len(MAGIC) + 8 + length


def _profile(header: Mapping[str, Any], path: Path) -> Profile:
    """The optimisation profile of a header: ``min``/``opt``/``max`` shapes by input name, checked."""
    try:
        shapes = {key: {str(n): tuple(int(d) for d in s) for n, s in header["profile"][key].items()}
                  for key in ("min", "opt", "max")}  # fmt: skip
        if not all(set(v) == set(shapes["min"]) for v in shapes.values()):
            raise ValueError("inputs differ")
        return Profile(**shapes)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{path}: corrupt plan header (malformed optimisation profile)") from None


def plan_mismatches(header: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What differs between a plan's header and the machine (or ONNX file) it is about to run on."""
    return [
        f"{key}: engine built for {header.get(key)!r}, here {value!r}"
        for key, value in expected.items()
        if value is not None and header.get(key) != value
    ]


# -- building -----------------------------------------------------------------------------------------------------
def engine_from_onnx(
    onnx_path: str | Path,
    plan_path: str | Path,
    precision: str = "fp32",
    max_batch: int = 4096,
    bag_sizes: Mapping[str, int | tuple[int, int, int]] | None = None,
    device_id: int = 0,
    workspace_bytes: int = 4 << 30,
    timing_cache: str | Path | None = None,
    tf32: bool = False,
) -> Path:
    """Build a TensorRT engine from an ONNX graph, with one optimisation profile, and write it as a ``.plan``.

    Args:
        onnx_path: The graph (exported by deepspot; its metadata goes into the plan's header).
        plan_path: Where to write the plan.
        precision: ``fp32``, ``fp16`` or ``bf16`` (TensorRT may run layers in the lower precision).
        max_batch: The profile's largest (and optimal) batch.
        bag_sizes: Sizes of the bag axes (see :func:`~deepspot.runtime.profiles.derive_profile`).
        device_id: The GPU to build for.
        workspace_bytes: Builder workspace limit.
        timing_cache: File that keeps kernel timings between builds.
        tf32: Let fp32 layers use TF32 tensor cores. TensorRT's own default is on; here it is off unless asked, so
            that an fp32 engine computes in fp32.
    """
    trt = import_trt()
    from ..fileio import file_sha256 as file_hash
    from .artifacts import read_onnx

    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"unknown precision {precision!r}; expected fp32, fp16 or bf16")
    info, inputs = read_onnx(onnx_path)
    ident = gpu_identity(device_id)
    profile = derive_profile(inputs, max_batch, bag_sizes)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    trt_profile = builder.create_optimization_profile()
    for name in profile.names():
        trt_profile.set_shape(name, profile.min[name], profile.opt[name], profile.max[name])
    config.add_optimization_profile(trt_profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise CheckpointError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    if timing_cache:
        with atomic_path(timing_cache) as tmp:
            Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))
    header = {
        "onnx_sha256": file_hash(onnx_path),
        "tensorrt_version": trt.__version__,
        "precision": precision,
        "tf32": tf32,
        "profile": profile.to_dict(),
        "input_dtypes": {name: spec.dtype for name, spec in inputs.items()},
        "model": info.to_dict() if info else None,
        **ident,
    }
    return write_plan(plan_path, bytes(engine), header)


# -- running ------------------------------------------------------------------------------------------------------
class TrtRunner(Runner):
    """Runs a ``.plan`` with ``execute_async_v3`` on one CUDA stream.

    Args:
        plan_path: The plan written by :func:`engine_from_onnx`.
        device_id: The GPU.
        onnx_path: If given, the engine must have been built from this exact file.
        name: Runner name in reports.
    """

    backend = "tensorrt"

    def __init__(
        self, plan_path: str | Path, device_id: int = 0, onnx_path: str | Path | None = None, name: str | None = None
    ):
        self.path = Path(plan_path)
        self.header, self._offset = read_plan_header(self.path)
        model = self.header.get("model")
        super().__init__(checked_info(model, str(self.path)) if model else None, name)
        if self.info is not None and self.header.get("tf32") is True and self.header.get("precision") == "fp32":
            self.info.precision = "tf32"  # the parity tolerance and the reports follow the math that ran
        self.device_id = device_id
        self.onnx_path = onnx_path
        self.profile = _profile(self.header, self.path)
        self._inputs: dict[str, TensorSpec] = {}
        self._outputs: list[str] = []
        self._buffers: dict[str, Any] = {}
        self._pinned = None

    @property
    def device(self) -> str:
        return f"cuda:{self.device_id}"

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self._outputs) or (OUTPUT_NAME,)

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        if not self._inputs:
            # An axis whose profile range is one value is fixed for this engine (pinned bag sizes); others are dynamic.
            lo, hi = self.profile.min, self.profile.max
            dtypes = self.header.get("input_dtypes", {})
            self._inputs = {
                n: TensorSpec(n, tuple(a if a == b else None for a, b in zip(lo[n], hi[n])), dtypes.get(n, "float32"))
                for n in lo
            }
        return self._inputs

    def activate_impl(self) -> None:
        import torch

        trt = import_trt()
        from ..fileio import file_sha256 as file_hash

        expected = {**gpu_identity(self.device_id), "tensorrt_version": trt.__version__}
        if self.onnx_path is not None:
            expected["onnx_sha256"] = file_hash(self.onnx_path)
        problems = plan_mismatches(self.header, expected)
        if problems:
            raise CheckpointError(f"{self.path}: engine does not match ({'; '.join(problems)}); rebuild it")
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            blob = f.read()
        torch.cuda.set_device(self.device_id)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise CheckpointError(f"{self.path}: TensorRT could not deserialize the engine")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self.device_id)
        self._pinned = PinnedPool()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: getattr(torch, np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))).name) for n in names}

    def deactivate_impl(self) -> None:
        self._buffers.clear()
        self._context = self._engine = self._runtime = self._stream = self._pinned = None

    def _device_buffer(self, name: str, shape: tuple[int, ...], dtype):
        import torch

        buf = self._buffers.get(name)
        size = int(np.prod(shape))
        if buf is None or buf.numel() < size:  # grown on demand, reused for every batch
            buf = self._buffers[name] = torch.empty(size, dtype=dtype, device=f"cuda:{self.device_id}")
        return buf[:size].view(shape)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.cuda.stream(self._stream):
            for name, a in feed.items():
                dev = self._device_buffer(name, a.shape, self._dtypes[name])
                # Staged in page-locked memory, reused between batches, so the copy is one asynchronous DMA.
                dev.copy_(torch.from_numpy(self._pinned.stage(name, a)), non_blocking=True)
                self._context.set_input_shape(name, a.shape)
                self._context.set_tensor_address(name, dev.data_ptr())
            outs = {}
            for name in self._outputs:
                shape = tuple(self._context.get_tensor_shape(name))
                outs[name] = self._device_buffer(name, shape, self._dtypes[name])
                self._context.set_tensor_address(name, outs[name].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"{self.name}: TensorRT execution failed")
            host = {name: t.to("cpu", non_blocking=True) for name, t in outs.items()}
        self._stream.synchronize()
        return {name: t.float().numpy() for name, t in host.items()}
