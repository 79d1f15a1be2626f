"""The onnxruntime backends: ``ort-cpu``, ``ort-cuda`` and ``ort-trt`` (CPU, CUDA and TensorRT providers).

Building is separate from running: :func:`session_from_onnx` makes a session (and checks that the providers asked
for are the ones that run it: onnxruntime itself drops to the CPU when a GPU provider fails to load), and
:class:`OrtRunner` runs it. On a GPU the runner binds inputs and outputs to device buffers (IO binding), stages
inputs through page-locked host memory, keeps outputs on the device until they are read, and can replay a CUDA
graph when every batch has the same shape. ``onnxruntime`` is imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import available_cpus, check_threads
from ..errors import BackendUnavailableError, ConfigError, InputError, advice
from ._onnxruntime import DRIVER_HINT, import_ort, ort_install
from .base import ModelInfo, Runner, TensorSpec, check_feed, conform_feed
from .profiles import Profile, trt_profile_options

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
}


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads share a core's matrix units, so they add nothing here)."""
    logical = available_cpus()
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            block: dict[str, str] = {}
            for line in f:
                if ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    block[key] = value
                    if key == "core id":
                        cores.add((block.get("physical id", "0"), value))
    except OSError:
        return logical
    return max(1, min(logical, len(cores))) if cores else logical


def session_options(threads: int | None = None, optimization: str = "all"):
    """Session options: graph optimisation level and intra-op threads (default: physical cores)."""
    ort = import_ort()
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(f"unknown optimisation level {optimization!r}; expected {', '.join(OPTIMIZATION_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
    so.intra_op_num_threads = physical_cores() if check_threads(threads) is None else threads
    so.inter_op_num_threads = 1  # one chain of large matrix products: parallel branches only steal cores
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Within a run the workers spin between operators: the median network is hundreds of small elementwise nodes,
    # and waking a sleeping worker for each costs more than the node (measured on 2 cores, paired runs in random
    # order: visium-uni 4 % and xenium-slide 2 % faster). When the run returns they stop at once
    # (force_spinning_stop), so they do not take the cores from what runs next in the process (the prefetch thread,
    # PyTorch, a benchmark's eager baseline: measured unchanged, where threads left spinning slowed it by 2 %).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def cuda_provider_options(device_id: int = 0, cuda_graph: bool = False, tf32: bool = False) -> dict[str, str]:
    """The CUDA provider's options. ``use_tf32`` is set either way: onnxruntime's default is on, which would run an
    fp32 graph's matrix products at TF32 (10-bit mantissa) and miss the fp32 parity tolerance."""
    return {
        "device_id": str(device_id),
        "enable_cuda_graph": "1" if cuda_graph else "0",
        "use_tf32": "1" if tf32 else "0",
    }


def trt_provider_options(
    cache_dir: str | Path,
    profile: Profile | None = None,
    fp16: bool = False,
    device_id: int = 0,
    workspace_bytes: int = 4 << 30,
    cuda_graph: bool = False,
) -> dict[str, str]:
    """onnxruntime TensorRT provider options: engine and timing caches under ``cache_dir``, fp16, the profile."""
    cache_dir = Path(cache_dir)
    options = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_max_workspace_size": str(int(workspace_bytes)),
        "trt_cuda_graph_enable": "True" if cuda_graph else "False",
    }
    if profile is not None:
        options.update(trt_profile_options(profile))
    return options


def session_from_onnx(
    path: str | Path,
    providers: Sequence[str | tuple[str, Mapping[str, str]]] = (CPU,),
    threads: int | None = None,
    optimization: str = "all",
    model_bytes: bytes | None = None,
):
    """Build an ``InferenceSession`` and check that it really runs on the first provider asked for.

    Args:
        path: The ONNX file.
        providers: Provider names, or ``(name, options)`` pairs, in priority order.
        threads: Intra-op threads; default physical cores.
        optimization: Graph optimisation level: ``disable``, ``basic``, ``extended`` or ``all``.
        model_bytes: A serialised graph to run instead of the file's (a graph derived from ``path``, which names it
            in messages).

    Raises:
        BackendUnavailableError: A provider is not in this onnxruntime build, or failed to load.
        CheckpointError: The file is missing or not a readable ONNX model.
    """
    from ..errors import CheckpointError

    ort = import_ort()
    names = [p if isinstance(p, str) else p[0] for p in providers]
    missing = [n for n in names if n not in ort.get_available_providers()]
    if missing:
        raise BackendUnavailableError(f"onnxruntime has no {missing[0]} here; {install_hint(missing[0])}")
    if model_bytes is None and not Path(path).is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    head = providers[0]
    device_id = 0 if isinstance(head, str) else int(dict(head[1]).get("device_id", 0))
    if names[0] != CPU:
        from .cuda_libs import cuda_device_error, installed_provider_error, preload_cuda_libraries

        preload_cuda_libraries()  # before the first CUDA session: CUDA 13 wheels' libraries included
        # A provider whose library cannot load, or that would find no GPU, is refused before a session is made:
        # onnxruntime would print an error block of its own and run on the CPU.
        error = installed_provider_error(names[0])
        if error is not None:
            raise BackendUnavailableError(f"{names[0]} failed to load ({error}); {load_hint(names[0], error)}")
        error = cuda_device_error(device_id)
        if error is not None:
            raise BackendUnavailableError(f"{names[0]} cannot use GPU {device_id} ({error}); {DRIVER_HINT}")
    try:
        options = session_options(threads, optimization)
        source = str(path) if model_bytes is None else model_bytes
        session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except Exception as e:  # onnxruntime's exception classes are not a stable import
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "graph capture" in first.lower():  # a node that cannot run inside a CUDA graph (onnxruntime says which)
            without = advice("RunnerOptions(cuda_graph=False)", "--no-cuda-graph")
            raise ConfigError(f"{path}: onnxruntime cannot capture it as a CUDA graph ({first}); run it without "
                              f"({without})") from None  # fmt: skip
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({first})") from None
    if names[0] not in session.get_providers():
        # onnxruntime lists a GPU provider as available even when loading it fails, then runs on the CPU.
        from .cuda_libs import cuda_device_error, provider_load_error

        load = provider_load_error(names[0])
        why = load or cuda_device_error(device_id) or "see onnxruntime's log above"
        hint = load_hint(names[0], load) if load else DRIVER_HINT
        raise BackendUnavailableError(
            f"{names[0]} failed to load ({why}); onnxruntime fell back to {session.get_providers()[0]}. {hint}"
        )
    return session


#: The CUDA stack's libraries that the nvidia wheels (or a CUDA toolkit on the linker's path) provide.
_CUDA_STACK = ("libcudart", "libcublas", "libcudnn", "libcurand", "libcufft", "libnvrtc")


def load_hint(provider: str, error: str) -> str:
    """What to do when ``provider`` is installed but cannot run, by what its loader said (``error``)."""
    if "libcuda.so" in error:  # the driver's library: nothing pip can fix
        return DRIVER_HINT
    if any(lib in error for lib in _CUDA_STACK):
        try:
            from onnxruntime.capi.build_and_package_info import cuda_version
        except ImportError:
            cuda_version = "its"
        return (
            f"onnxruntime-gpu needs the CUDA {cuda_version} and cuDNN 9 libraries: "
            "pip install 'onnxruntime-gpu[cuda,cudnn]' nvidia-cublas (a CUDA build of PyTorch brings them too), "
            "or put a CUDA toolkit's lib64 on LD_LIBRARY_PATH"
        )
    return install_hint(provider)


def install_hint(provider: str) -> str:
    if provider == TRT:
        return "onnxruntime-gpu with TensorRT: " + ort_install().gpu_hint("gpu,tensorrt")
    if provider == CUDA:
        return ort_install().gpu_hint()
    return "pip install 'deepspot[cpu]'"


def graph_specs(session) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Input and output specs of a session's graph (dynamic axes as their names)."""

    def spec(arg) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
        return TensorSpec(arg.name, shape, _ORT_DTYPES.get(arg.type, "float32"))

    return {a.name: spec(a) for a in session.get_inputs()}, {a.name: spec(a) for a in session.get_outputs()}


class OrtRunner(Runner):
    """Runs an ONNX graph with onnxruntime.

    Args:
        path: The ONNX file.
        backend: ``ort-cpu``, ``ort-cuda`` or ``ort-trt``.
        info: Model metadata (read from the file by :func:`deepspot.runtime.load_runner`).
        providers: Providers with options, in priority order (:func:`deepspot.runtime.load_runner` fills them in).
        device_id: GPU index for the GPU backends.
        threads: Intra-op threads (CPU work); default physical cores.
        cuda_graph: Capture CUDA graphs and replay them: one per input shape (past the batch axis), each on fixed
            device buffers of ``batch_size`` rows or more; shorter batches are zero-padded to their graph's rows
            (:class:`~deepspot.runtime._ort_gpu.CudaGraphs`).
        io_binding: Bind inputs and outputs to device buffers (default: on the GPU backends only). On ``ort-cpu`` it
            runs the same binding code on host memory, which is how that code is tested without a GPU.
        name: Runner name in reports.
        batch_size: The batch size the runner will see (the rows of its CUDA graphs).
    """

    def __init__(
        self,
        path: str | Path,
        backend: str = "ort-cpu",
        info: ModelInfo | None = None,
        providers: Sequence[Any] | None = None,
        device_id: int = 0,
        threads: int | None = None,
        cuda_graph: bool = False,
        io_binding: bool | None = None,
        name: str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(info, name or backend)
        self.backend = backend
        self.path = Path(path)
        self.device_id = device_id
        self.providers = list(providers) if providers is not None else [CPU]
        self.threads = threads
        self.cuda_graph = cuda_graph
        self.on_gpu = backend != "ort-cpu"
        self.io_binding = self.on_gpu if io_binding is None else io_binding
        self.session = None
        self._inputs: dict[str, TensorSpec] = {}
        self._outputs: dict[str, TensorSpec] = {}
        self.batch_size = batch_size
        self._io = None  # DeviceIO with IO binding
        self._model_bytes: bytes | None = None  # a graph derived from the file, run instead of it
        self._cuda = None  # the CUDA runtime and the session's compute stream (ort-cuda), kept across activations
        self._compute_stream = 0
        self._adapter = None  # the overlapping pipeline's adapter, made on first use while active

    @property
    def device(self) -> str:
        return f"cuda:{self.device_id}" if self.on_gpu else "cpu"

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self._outputs)

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        if not self._inputs:
            raise RuntimeError(f"{self.name}: activate() the runner first")
        return self._inputs

    def activate_impl(self) -> None:
        providers = self.providers
        if self.on_gpu and self.backend == "ort-cuda" and self.io_binding:
            providers = self._with_compute_stream(providers)
        self.session = session_from_onnx(self.path, providers, self.threads, model_bytes=self._model_bytes)
        self._inputs, self._outputs = graph_specs(self.session)
        if self.io_binding:
            from ._ort_gpu import DeviceIO

            annotated = self.session.get_providers()[0] != TRT  # TensorRT's provider captures one graph only
            self._io = DeviceIO(self.session, self._inputs, self._outputs, self.device_id, self.cuda_graph,
                                self.device_type, self.batch_size, annotated, self._cuda)  # fmt: skip

    @property
    def device_type(self) -> str:
        """Where bound buffers live: ``cuda``, or ``cpu`` on ``ort-cpu``."""
        return "cuda" if self.on_gpu else "cpu"

    def _with_compute_stream(self, providers):
        """The CUDA provider's options with a compute stream of ours, so that the pipeline can order its copies
        around onnxruntime's work with events. Without a loadable CUDA runtime the runner works as before, without
        the overlapping pipeline (``deepspot doctor`` says why)."""
        from .cuda_libs import CudaError, CudaRuntime

        if self._cuda is None:  # one stream for the runner's life: sessions of later activations reuse it
            try:
                cuda = CudaRuntime(self.device_id)
                self._compute_stream, self._cuda = cuda.stream(), cuda
            except (CudaError, OSError, AttributeError):
                return providers
        stream = {"user_compute_stream": str(self._compute_stream), "has_user_compute_stream": "1"}
        return [(p[0], {**p[1], **stream}) if not isinstance(p, str) and p[0] == CUDA else p for p in providers]

    def pipeline_adapter(self, batch_size: int):
        if not self.is_active or self._cuda is None or self._io is None:
            return None
        if self._adapter is None:  # one per activation: its ring, device buffers and graphs serve every call
            from ._ort_gpu import OrtCudaAdapter

            self._adapter = OrtCudaAdapter(self, self._cuda, self._compute_stream)
        return self._adapter, None

    def deactivate_impl(self) -> None:
        adapter, io = self._adapter, self._io
        self._adapter, self._io, self.session = None, None, None  # dropped even if freeing their buffers fails
        try:
            if adapter is not None:
                adapter.close()
        finally:
            if io is not None:
                io.close()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._io is not None:
            return self._io.run(feed)
        outputs = self.session.run(list(self._outputs), feed)
        return {name: np.asarray(y, dtype=np.float32) for name, y in zip(self._outputs, outputs)}

    def resident_rate(self, feed: dict[str, np.ndarray], repeats: int = 20) -> float:
        """Items per second of the graph alone on ``feed``, copied to the device once (no host transfers): the
        compute bound of a pipeline, measured. Needs IO binding (on by default on the GPU backends)."""
        if not self.is_active or self._io is None:
            raise InputError(f"{self.name}: a resident run needs IO binding (the GPU backends)")
        feed = {k: np.ascontiguousarray(v, dtype=self._inputs[k].dtype) for k, v in feed.items()}
        rows = next(iter(feed.values())).shape[0]
        return rows * repeats / self._io.run_resident(feed, repeats)

    def infer_into(self, feed: dict[str, np.ndarray], output: str, address: int, check_inputs: bool = True) -> None:
        """Run on ``feed`` and copy output ``output`` (its real rows, in the graph's dtype) to ``address`` in device
        memory, where the next graph reads it: the indexed layout's encoder fills the slide's table on the GPU this
        way, and no embedding crosses the bus. Needs IO binding. ``check_inputs`` as in :meth:`infer`."""
        if not self.is_active or self._io is None:
            raise InputError(f"{self.name}: outputs stay on the device only with IO binding (the GPU backends)")
        if check_inputs:
            feed = conform_feed(feed, self._inputs, where=self.name)
            check_feed(feed, self._inputs, where=self.name)
        rows = next(iter(feed.values())).shape[0]
        feed = {k: np.ascontiguousarray(v, dtype=self._inputs[k].dtype) for k, v in feed.items()}
        value = self._io.run(feed, to_host=False)[output]
        nbytes = rows * int(np.prod(value.shape()[1:])) * np.dtype(self._outputs[output].dtype).itemsize
        if self._cuda is not None:
            self._cuda.copy(address, value.data_ptr(), nbytes, self._cuda.D2D)
        elif not self.on_gpu:  # the same code on host memory (ort-cpu with IO binding: the tests)
            import ctypes

            ctypes.memmove(address, value.data_ptr(), nbytes)
        else:
            raise InputError(f"{self.name}: no CUDA runtime to copy on the device (see deepspot doctor)")

    def infer_on_device(self, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        """Run and return the outputs as device ``OrtValue``s (for a second graph to consume without a host copy).

        Needs IO binding (on by default on the GPU backends). Under a CUDA graph the values keep the padded batch.
        """
        if not self.is_active or self._io is None:
            raise InputError(f"{self.name}: outputs stay on the device only with IO binding (the GPU backends)")
        return self._io.run(feed, to_host=False)
