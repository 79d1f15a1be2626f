"""Finding and loading the CUDA libraries, and the few CUDA runtime calls the ONNX pipeline needs, without PyTorch.

onnxruntime-gpu does not ship CUDA: it loads ``libcudart``, cuBLAS, cuDNN and the rest from wherever the dynamic
linker finds them, or from the ``nvidia-*`` wheels that :func:`onnxruntime.preload_dlls` knows. The CUDA 13 wheels
moved the toolkit's libraries into one ``nvidia/cu13/lib`` folder, which older ``preload_dlls`` miss (onnxruntime
issue #29198), and onnxruntime lists the CUDA provider as available even when loading it fails, then runs on the
CPU (issue #23372). So:

- :func:`preload_cuda_libraries` loads, with ``RTLD_GLOBAL``, the libraries of the ``nvidia`` folders on the path
  (``cu13/lib`` included), then calls ``preload_dlls`` where onnxruntime has it, for what else it loads;
- :func:`provider_load_error` says which library a provider failed to load, by loading the provider's own shared
  library and reading the linker's message;
- :class:`CudaRuntime` wraps the CUDA runtime calls of the pipeline (page-locked allocation, streams, events,
  asynchronous copies) through ``ctypes``.

Nothing here has run on a GPU yet (no GPU was available when it was written); it follows the CUDA runtime and
onnxruntime documentation.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import io
import os
import site
import sys
import threading
from pathlib import Path
from typing import Any

#: Library name patterns of the CUDA stack, in load order (cuBLAS needs cuBLASLt first).
CUDA_LIBRARIES = ("libcudart.so.*", "libcublasLt.so.*", "libcublas.so.*", "libcurand.so.*", "libcufft.so.*",
                  "libnvrtc.so.*", "libcudnn.so.*")  # fmt: skip


def nvidia_library_dirs() -> list[Path]:
    """``site-packages/nvidia/*/lib`` folders (``cu13/lib`` of the consolidated CUDA 13 wheels among them)."""
    roots = [Path(p) for p in (*site.getsitepackages(), site.getusersitepackages(), *sys.path) if p]
    dirs = []
    for root in roots:
        for lib in sorted(glob.glob(str(root / "nvidia" / "*" / "lib"))):
            if Path(lib) not in dirs:
                dirs.append(Path(lib))
    return dirs


def find_library(pattern: str) -> Path | None:
    """The first file matching ``pattern`` in the nvidia wheels' folders (highest version first)."""
    for folder in nvidia_library_dirs():
        found = sorted(folder.glob(pattern), reverse=True)
        if found:
            return found[0]
    return None


@functools.lru_cache(maxsize=1)
def preload_cuda_libraries() -> dict[str, str]:
    """Load the CUDA libraries before the first CUDA session; return ``{library: where it came from or why not}``.

    The ``nvidia`` wheels' folders on the path come first. ``onnxruntime.preload_dlls`` looks for them only beside
    onnxruntime's own folder, so it misses them when onnxruntime-gpu lies in another folder than the CUDA wheels (a
    ``--target`` folder, a user site, a second venv on ``PYTHONPATH``) and prints a line for each library it cannot
    load. Called after the explicit loads, it finds those already loaded; what it still prints goes into the report,
    not onto the user's output.

    Safe to call on machines without CUDA (everything is reported as not found) and cached: it runs once.
    """
    report: dict[str, str] = {}
    for pattern in CUDA_LIBRARIES:
        path = find_library(pattern)
        if path is None:
            report[pattern] = "not in the nvidia wheels (the system's linker paths are used)"
            continue
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            report[pattern] = str(path)
        except OSError as e:
            report[pattern] = f"failed to load: {e}"
    try:
        import onnxruntime

        if hasattr(onnxruntime, "preload_dlls"):
            said = io.StringIO()
            with contextlib.redirect_stdout(said):
                onnxruntime.preload_dlls(directory="")  # nvidia site packages, then the default paths
            words = " ".join(said.getvalue().split())
            report["onnxruntime.preload_dlls"] = f"called; it said: {words[:400]}" if words else "called"
    except Exception as e:  # noqa: BLE001  the explicit loads above are done; a failing preload only gets reported
        report["onnxruntime.preload_dlls"] = f"failed: {e}"
    return report


def provider_library(provider: str) -> Path | None:
    """The shared library of an onnxruntime execution provider (``CUDAExecutionProvider`` -> ``..._cuda.so``)."""
    names = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}
    if provider not in names:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    path = Path(onnxruntime.__file__).parent / "capi" / f"libonnxruntime_providers_{names[provider]}.so"
    return path if path.is_file() else None


def provider_load_error(provider: str) -> str | None:
    """Why ``provider`` cannot load (the linker's message names the missing library), or ``None`` if it loads."""
    path = provider_library(provider)
    if path is None:
        return f"{provider} is not part of this onnxruntime build"
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        message = str(e).replace(str(path.parent) + os.sep, "")
        if "libcuda.so" in message:  # the driver's library, which no wheel provides
            message += " (libcuda.so.1 comes with the NVIDIA driver: none is installed or visible here)"
        return message
    return None


def installed_provider_error(provider: str) -> str | None:
    """Why a provider whose library is installed does not load; ``None`` when it loads or is not in this build
    (onnxruntime lists CUDA and TensorRT whether or not their libraries load)."""
    return provider_load_error(provider) if provider_library(provider) is not None else None


# -- the CUDA runtime, through ctypes -----------------------------------------------------------------------------
class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


def load_cudart() -> tuple[Any, str]:
    """The CUDA runtime library (the nvidia wheels' on the path first, else the linker's) and where it came from."""
    preload_cuda_libraries()
    path = find_library("libcudart.so.*")
    name = str(path) if path else "libcudart.so"
    try:
        return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL), name
    except OSError as e:
        raise CudaError(f"the CUDA runtime (libcudart) cannot be loaded: {e}") from None


def cuda_error_string(lib: Any, code: int) -> str:
    """A CUDA runtime error code in words, with the code."""
    get = lib.cudaGetErrorString
    get.restype = ctypes.c_char_p
    return f"{get(code).decode()} (error {code})"


def _dotted(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"  # CUDA encodes 13.0 as 13000


def cuda_versions() -> dict[str, str]:
    """The versions of the CUDA runtime, of the driver's CUDA API and of cuDNN that this process finds, or why not.

    No GPU is needed: nothing here picks a device, so a machine with the libraries and a missing or broken driver
    still reports them.
    """
    found: dict[str, str] = {}
    try:
        lib, name = load_cudart()
    except CudaError as e:
        found["cuda runtime"] = f"not found ({e})"
    else:
        runtime, driver = ctypes.c_int(), ctypes.c_int()
        lib.cudaRuntimeGetVersion(ctypes.byref(runtime))
        code = lib.cudaDriverGetVersion(ctypes.byref(driver))  # 0 where no driver is installed
        found["cuda runtime"] = f"{_dotted(runtime.value)} ({name})"
        if code != 0:  # a driver that does not answer, or one the runtime cannot use
            found["cuda driver api"] = f"unknown ({cuda_error_string(lib, code)})"
        else:
            found["cuda driver api"] = _dotted(driver.value) if driver.value else "none (no NVIDIA driver)"
    cudnn = find_library("libcudnn.so.*")
    try:
        lib = ctypes.CDLL(str(cudnn) if cudnn else "libcudnn.so.9")
        lib.cudnnGetVersion.restype = ctypes.c_size_t
        v = lib.cudnnGetVersion()
        found["cudnn"] = f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    except (OSError, AttributeError):
        found["cudnn"] = "not found"
    return found


def cuda_device_error(device_id: int = 0) -> str | None:
    """Why the CUDA runtime cannot use GPU ``device_id`` (no runtime, no driver, no GPU, no such index), or ``None``.

    It asks for the number of GPUs only, which makes no CUDA context: a cohort's worker on GPU 3 must not make one on
    GPU 0 by asking.
    """
    try:
        lib, _ = load_cudart()
    except CudaError as e:
        return str(e)
    count = ctypes.c_int()
    code = lib.cudaGetDeviceCount(ctypes.byref(count))
    if code != 0:
        return f"cudaGetDeviceCount failed: {cuda_error_string(lib, code)}"
    if not 0 <= device_id < count.value:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = "" if visible is None else f" with CUDA_VISIBLE_DEVICES={visible!r}"
        return f"there is no GPU {device_id}: the CUDA runtime sees {count.value}{where}"
    return None


class CudaRuntime:
    """The CUDA runtime calls of the pipeline: page-locked memory, streams, events and asynchronous copies.

    Every call runs on ``device_id``, from whichever thread it is made: the runtime's current device is per thread,
    and the pipeline's prefetch thread allocates the ring's page-locked buffers. Left at the default there, it would
    make a context on GPU 0 (hundreds of MiB of that GPU's memory) for a run on another GPU.
    """

    H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice
    NON_BLOCKING, DISABLE_TIMING = 0x01, 0x02

    def __init__(self, device_id: int = 0):
        self.lib, _ = load_cudart()
        self.device_id = device_id
        self._thread = threading.local()  # .device: the device this thread was set to
        self._set_device()

    def _set_device(self) -> None:
        code = self.lib.cudaSetDevice(ctypes.c_int(self.device_id))
        if code != 0:
            raise CudaError(f"cudaSetDevice failed: {cuda_error_string(self.lib, code)}")
        self._thread.device = self.device_id

    def _call(self, name: str, *args: Any) -> None:
        if getattr(self._thread, "device", None) != self.device_id:  # a thread's first call
            self._set_device()
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise CudaError(f"{name} failed: {cuda_error_string(self.lib, code)}")

    def version(self) -> tuple[int, int]:
        """``(runtime, driver)`` versions as CUDA encodes them (13000 for 13.0)."""
        runtime, driver = ctypes.c_int(), ctypes.c_int()
        self._call("cudaRuntimeGetVersion", ctypes.byref(runtime))
        self._call("cudaDriverGetVersion", ctypes.byref(driver))
        return runtime.value, driver.value

    def host_alloc(self, nbytes: int) -> ctypes.c_void_p:
        ptr = ctypes.c_void_p()
        self._call("cudaHostAlloc", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1)), ctypes.c_uint(0))
        return ptr

    def free_host(self, ptr: ctypes.c_void_p) -> None:
        self._call("cudaFreeHost", ptr)

    def malloc(self, nbytes: int) -> int:
        """Device memory (``cudaMalloc``); the address."""
        ptr = ctypes.c_void_p()
        self._call("cudaMalloc", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1)))
        return ptr.value or 0

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ctypes.c_void_p(ptr))

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self._call("cudaStreamCreateWithFlags", ctypes.byref(handle), ctypes.c_uint(self.NON_BLOCKING))
        return handle.value or 0

    def event(self) -> int:
        handle = ctypes.c_void_p()
        self._call("cudaEventCreateWithFlags", ctypes.byref(handle), ctypes.c_uint(self.DISABLE_TIMING))
        return handle.value or 0

    def copy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                   ctypes.c_int(kind), ctypes.c_void_p(stream))  # fmt: skip

    def destroy_stream(self, stream: int) -> None:
        self._call("cudaStreamDestroy", ctypes.c_void_p(stream))

    def destroy_event(self, event: int) -> None:
        self._call("cudaEventDestroy", ctypes.c_void_p(event))

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        """A copy that has ended when this returns: ``cudaMemcpy``, then a wait for the default stream it ran on.

        ``cudaMemcpy`` alone returns before a device-to-device copy has ended, and before the last DMA of a copy from
        pageable memory has (CUDA runtime API, "API synchronization behavior"). The streams here are non-blocking, so
        nothing would order the next graph's reads (or a graph's next write to the copy's source) after it.
        """
        self._call("cudaMemcpy", ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                   ctypes.c_int(kind))  # fmt: skip
        self._call("cudaStreamSynchronize", ctypes.c_void_p(0))  # the legacy default stream, where cudaMemcpy ran

    def record(self, event: int, stream: int) -> None:
        self._call("cudaEventRecord", ctypes.c_void_p(event), ctypes.c_void_p(stream))

    def wait_event(self, stream: int, event: int) -> None:
        self._call("cudaStreamWaitEvent", ctypes.c_void_p(stream), ctypes.c_void_p(event), ctypes.c_uint(0))

    def synchronize(self, event: int) -> None:
        self._call("cudaEventSynchronize", ctypes.c_void_p(event))

    def synchronize_stream(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", ctypes.c_void_p(stream))


__all__ = [
    "CudaError",
    "CudaRuntime",
    "cuda_device_error",
    "cuda_error_string",
    "cuda_versions",
    "find_library",
    "installed_provider_error",
    "load_cudart",
    "nvidia_library_dirs",
    "preload_cuda_libraries",
    "provider_load_error",
]
