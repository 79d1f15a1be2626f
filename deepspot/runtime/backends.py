"""The backend registry, backend selection and the one entry point that builds a runner for a model file.

A backend asked for is the backend that runs, or an error that says what to install: never a silent switch to the
CPU. ``allow_fallback=True`` permits walking the backend's fallback chain (``tensorrt -> ort-trt -> ort-cuda ->
ort-cpu``, ``torch-cuda -> torch``), and a fallback is announced with a :class:`FallbackWarning` and a log line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import at_least, check_precision, check_threads
from ..errors import BackendUnavailableError, ConfigError, advice, option, option_value
from .artifacts import artifact_kind, read_onnx
from ._onnxruntime import DRIVER_HINT, GPU_INSTALL, OrtInstall, import_ort, ort_install
from .base import ModelInfo, Runner
from .ort import CPU, CUDA, TRT, load_hint

log = logging.getLogger("deepspot.runtime")


class FallbackWarning(UserWarning):
    """A requested backend was unavailable and ``allow_fallback`` let another one run."""


@dataclass(frozen=True)
class Backend:
    """One backend.

    Attributes:
        name: Registry name.
        runs: What it runs: ``model`` (a PyTorch model or checkpoint) or ``onnx`` (``tensorrt`` also runs ``plan``).
        device: ``cpu`` or ``cuda``.
        needs: What must be installed, in words.
        install: How to install it.
        fallback: The backend tried next when fallback is allowed.
        providers: onnxruntime providers, in priority order.
    """

    name: str
    runs: str
    device: str
    needs: str
    install: str
    fallback: str | None = None
    providers: tuple[str, ...] = ()


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", "model", "cpu", "PyTorch", "pip install 'deepspot[torch]'"),
        Backend(
            "torch-cuda",
            "model",
            "cuda",
            "a CUDA build of PyTorch and an NVIDIA GPU",
            "install a CUDA build of PyTorch",
            "torch",
        ),
        Backend("ort-cpu", "onnx", "cpu", "onnxruntime", "pip install 'deepspot[cpu]'", None, (CPU,)),
        Backend(
            "ort-cuda",
            "onnx",
            "cuda",
            "onnxruntime-gpu (CUDA provider) and an NVIDIA GPU",
            GPU_INSTALL,
            "ort-cpu",
            (CUDA, CPU),
        ),
        Backend(
            "ort-trt",
            "onnx",
            "cuda",
            "onnxruntime-gpu with TensorRT, and an NVIDIA GPU",
            "install onnxruntime-gpu with TensorRT: pip install 'deepspot[gpu,tensorrt]'",
            "ort-cuda",
            (TRT, CUDA, CPU),
        ),
        Backend(
            "tensorrt",
            "onnx",
            "cuda",
            "NVIDIA TensorRT 10 and an NVIDIA GPU",
            "pip install 'deepspot[tensorrt]'",
            "ort-trt",
        ),
    )
}
DEFAULT_BACKEND = {"model": "torch", "onnx": "ort-cpu", "plan": "tensorrt"}


@dataclass(frozen=True)
class Probe:
    """What this machine offers: onnxruntime's providers, PyTorch and a CUDA GPU for it, the TensorRT package."""

    providers: tuple[str, ...] = ()
    cuda: bool = False
    tensorrt: bool = False
    torch: bool = True
    ort: OrtInstall | None = None  # which onnxruntime package is installed (for the hint when a provider is missing)
    ort_error: str | None = None  # why an installed onnxruntime does not import, with the fix
    torch_cuda_build: str | None = None  # torch.version.cuda when PyTorch was asked for a GPU (None: a CPU build)
    # GPU providers that onnxruntime lists but that cannot run (a library that does not load, no usable GPU), with
    # why and what to do (onnxruntime lists them all the same, then runs on the CPU)
    provider_problems: dict[str, str] = field(default_factory=dict)

    @classmethod
    def detect(cls, torch_cuda: bool = True, load_providers: bool = True) -> "Probe":
        """Probe this machine; ``torch_cuda=False`` skips asking PyTorch for a GPU (importing torch takes seconds,
        and only ``torch-cuda`` and ``tensorrt`` need the answer), ``load_providers=False`` skips loading the GPU
        providers' libraries (the CUDA stack, a second or so; only ``ort-cuda`` and ``ort-trt`` need it)."""
        providers: tuple[str, ...] = ()
        install, error = ort_install(), None
        if install.module is not None:
            try:
                providers = tuple(import_ort().get_available_providers())
            except BackendUnavailableError as e:  # a broken install: no providers, and why, with how to repair it
                error = str(e)
        has_trt = importlib.util.find_spec("tensorrt") is not None
        ort = {"ort": install, "ort_error": error, "provider_problems": {}}
        gpu_providers = [p for p in (CUDA, TRT) if p in providers]
        if load_providers and gpu_providers:
            from .cuda_libs import cuda_device_error, installed_provider_error, preload_cuda_libraries

            preload_cuda_libraries()
            for provider in gpu_providers:
                failed = installed_provider_error(provider)
                if failed:
                    why = f"{provider} is listed but does not load ({failed}); {load_hint(provider, failed)}"
                    ort["provider_problems"][provider] = why
                elif failed := cuda_device_error(0):  # GPU 0 exists wherever a GPU does
                    ort["provider_problems"][provider] = f"{provider} finds no usable GPU ({failed}); {DRIVER_HINT}"
        if importlib.util.find_spec("torch") is None:  # a serving install: the ONNX backends need no PyTorch
            return cls(providers, False, has_trt, torch=False, **ort)
        if not torch_cuda:
            return cls(providers, False, has_trt, **ort)
        import torch

        return cls(providers, torch.cuda.is_available(), has_trt, torch_cuda_build=torch.version.cuda, **ort)


def unavailable_reason(name: str, probe: Probe) -> str | None:
    """Why backend ``name`` cannot run here, with the install hint; ``None`` when it can."""
    b = get_backend(name)
    missing = [p for p in b.providers if p not in probe.providers]
    failed = [p for p in b.providers if p in probe.provider_problems]
    if failed and not missing:
        return f"backend {name!r} needs {b.needs}: {probe.provider_problems[failed[0]]}"
    if missing:
        install = probe.ort
        if install and install.problem():  # both packages in one folder, or a module deleted under its package
            return f"backend {name!r} needs {b.needs}: {install.problem()}"
        if probe.ort_error:  # installed, but it does not import
            return f"backend {name!r} needs {b.needs}: {probe.ort_error}"
        hint = b.install
        if install and missing[0] in (CUDA, TRT):
            hint = install.gpu_hint("gpu" if missing[0] == CUDA else "gpu,tensorrt")
        if install and install.module is None:
            return f"backend {name!r} needs {b.needs}: onnxruntime is not installed; {hint}"
        return f"backend {name!r} needs {b.needs}: onnxruntime here has no {missing[0]}; {hint}"
    if b.runs == "model" and not probe.torch:
        return f"backend {name!r} needs PyTorch, which is not installed: {get_backend('torch').install}"
    if name == "tensorrt" and not probe.torch:  # the native runner's device buffers and streams are torch's
        return (
            f"backend {name!r} needs PyTorch for its CUDA buffers, which is not installed: "
            f"{get_backend('torch').install}; ort-trt runs TensorRT without it"
        )
    if name == "tensorrt" and not probe.tensorrt:
        return f"backend {name!r} needs {b.needs}: the tensorrt package is not installed; {b.install}"
    if b.device == "cuda" and not probe.cuda and not b.providers:
        if probe.torch_cuda_build:  # the right PyTorch, but no driver or no visible GPU: reinstalling would not help
            return (
                f"backend {name!r} needs {b.needs}: PyTorch is a CUDA {probe.torch_cuda_build} build but sees no GPU; "
                f"{DRIVER_HINT}"
            )
        return f"backend {name!r} needs {b.needs}: PyTorch sees no CUDA GPU; {b.install}"
    return None


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; expected one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_backend`: what was asked for, what runs, and why it differs."""

    requested: str
    backend: str
    reasons: tuple[str, ...] = ()

    @property
    def fell_back(self) -> bool:
        return self.backend != self.requested


def select_backend(
    requested: str,
    allow_fallback: bool = False,
    probe: Probe | None = None,
    kind: str = "onnx",
    fallback_hint: bool = True,
) -> Selection:
    """The backend that will run: ``requested`` if it can, else (with ``allow_fallback``) the first in its chain.

    Args:
        requested: Backend name.
        allow_fallback: Permit another backend when ``requested`` cannot run; the switch is warned about.
        probe: What the machine offers (detected when ``None``).
        kind: What the model file is (``model``, ``onnx``, ``plan``); a plan runs on ``tensorrt`` only.
        fallback_hint: Say in the error that ``allow_fallback`` permits another backend, where it would (never
            for a backend without a fallback, nor for a plan); ``False`` where the caller does not take that option
            (a cohort).

    Raises:
        BackendUnavailableError: The backend cannot run here and fallback is off (or the chain is exhausted).
    """
    get_backend(requested)
    if probe is None:
        chain, name = [], requested
        while name is not None:
            chain.append(name)
            name = get_backend(name).fallback if allow_fallback else None
        probe = Probe.detect(torch_cuda=any(get_backend(n).device == "cuda" and not get_backend(n).providers
                                            for n in chain),
                             load_providers=any(p != CPU for n in chain for p in get_backend(n).providers))  # fmt: skip
    reasons: list[str] = []
    name: str | None = requested
    while name is not None:
        reason = unavailable_reason(name, probe)
        if reason is None:
            selection = Selection(requested, name, tuple(reasons))
            if selection.fell_back:
                message = f"falling back from {requested!r} to {name!r}: {reasons[0]}"
                log.info(message)  # the warning is what users see; the log line is for applications that log
                warnings.warn(message, FallbackWarning, stacklevel=2)
            return selection
        reasons.append(reason)
        if not allow_fallback or (kind == "plan" and name == "tensorrt"):
            break
        name = get_backend(name).fallback
    could_fall_back = fallback_hint and not allow_fallback and get_backend(requested).fallback is not None
    hint = ""
    if could_fall_back and kind != "plan":
        hint = f" ({option_value('allow_fallback', True)} permits another backend)"
    raise BackendUnavailableError(reasons[0] + hint)


def default_cache_dir() -> Path:
    """Where TensorRT engines are cached: ``$DEEPSPOT_CACHE`` or ``~/.cache/deepspot``."""
    return Path(os.environ.get("DEEPSPOT_CACHE") or Path.home() / ".cache" / "deepspot")


@dataclass
class RunnerOptions:
    """How to build a runner; every field has a default that suits batch inference.

    Attributes:
        device: GPU index for the GPU backends.
        precision: Compute precision; ``None`` keeps the file's own (onnxruntime runs a graph at its exported
            precision; TensorRT and torch can lower it).
        batch_size: Largest batch (TensorRT profiles, CUDA graphs).
        bag_sizes: Sizes of the bag axes in the data (TensorRT profiles).
        threads: Intra-op threads on the CPU, 1 to the CPUs this process may use (``None``: physical cores).
        compile: ``torch.compile`` the torch backend.
        torch_graph: What the torch backends run: ``eager`` (the model as written, the reference) or ``export``
            (the exporter's module: fused Phi ensemble, folded Rho; what the ONNX graphs compute).
        cuda_graph: Replay a CUDA graph on the GPU backends of onnxruntime (``None``: on for ``ort-cuda``).
        tf32: Let fp32 matrix products run on the GPU's TF32 tensor cores (fp32 range, a 10-bit mantissa): several
            times faster, not fp32-exact (the ``tf32`` row of the parity tolerances). Off by default, so that fp32
            means fp32: onnxruntime's CUDA provider and TensorRT turn it on unless told otherwise. GPU backends only.
        cache_dir: TensorRT engine and timing caches.
        io: The features' dtype as the runner takes them, ``fp32`` or ``fp16``: fp16 features cross the bus as they
            are (half the bytes) and are cast on the device. The torch backends take either (``None``: fp32); an
            ONNX graph's is fixed at export (``deepspot export --io fp16``), and given here it must match.
    """

    device: int = 0
    precision: str | None = None
    batch_size: int = 256
    bag_sizes: dict[str, int] = field(default_factory=dict)
    threads: int | None = None
    compile: bool = False
    torch_graph: str = "eager"
    cuda_graph: bool | None = None
    tf32: bool = False
    cache_dir: Path | None = None
    io: str | None = None

    def __post_init__(self):
        # Checked here, before any work: 10,000 threads made a machine unusable, and a batch of 0 meant the default.
        check_threads(self.threads)
        at_least(self.batch_size, option("batch_size"))
        # A GPU index below 0 was passed over on the CPU backends, and an unknown precision was taken for one the
        # graph lacks ("export it with --precision FP32").
        at_least(self.device, option("device"), 0)
        check_precision(self.precision)


def load_runner(
    model: Any,
    backend: str | None = None,
    options: RunnerOptions | None = None,
    allow_fallback: bool = False,
    probe: Probe | None = None,
) -> Runner:
    """Build (but do not activate) the runner for a model, a checkpoint, an ONNX file or a TensorRT plan.

    Use it as a context manager (or ``activate()`` it), then ``runner.infer(feed)``: a feed maps each input name
    (``spot``, ``subspot``, ``neighbors`` or ``cell``, ``neighbors``) to a float NumPy array ``(B, n, D)`` (a single
    tile may be ``(B, D)``; float64 is cast), and the result maps ``expression`` to float32 ``(B, G)``, on the
    model's standardised scale unless the export folded the scaler (``runner.info.inverse_transform`` maps it back).
    The runner's ``selection`` attribute records the backend asked for and the one that runs.

    Args:
        model: A path (``.onnx``, ``.plan``, a ``.safetensors`` checkpoint or a reference file) or an in-memory
            DeepSpot/DeepCell (torch backends).
        backend: A name from :data:`BACKENDS`; default ``ort-cpu`` for ONNX, ``torch`` for a checkpoint or model,
            ``tensorrt`` for a plan.
        options: How to build the runner (:class:`RunnerOptions`: device, precision, threads, ...).
        allow_fallback: Permit another backend where ``backend`` cannot run here (with a :class:`FallbackWarning`).
        probe: What this machine can run (default: probed once).

    Raises:
        BackendUnavailableError: The backend cannot run here (see :func:`select_backend`).
        ConfigError: The backend cannot run this kind of file, or the precision does not fit.
        CheckpointError: The file is missing or unreadable.
        TypeError: ``model`` is neither a path nor a model.
    """
    options = options or RunnerOptions()
    kind = artifact_kind(model)
    requested = backend or DEFAULT_BACKEND[kind]
    b = get_backend(requested)
    if kind == "plan" and requested != "tensorrt":
        raise ConfigError(f"{model}: a TensorRT plan runs on the tensorrt backend only, not {requested!r}")
    if kind != "plan" and b.runs != kind:
        what = "a checkpoint or model"
        if b.runs != "model":
            what = f"an ONNX file ({advice('deepspot.export.export_onnx', 'deepspot export')})"
        if not isinstance(model, (str, Path)):  # its repr is the whole module tree
            given = f"an in-memory {type(model).__name__} is a model (deepspot.export.export_onnx writes its graph)"
        else:
            given = f"{model} is {'an ONNX file' if kind == 'onnx' else 'a checkpoint'}"
        raise ConfigError(f"backend {requested!r} runs {what}; {given}")
    # The backend asked for counts, as it does for --device; a fallback leaves out what its backend cannot take.
    check_gpu_options(options, requested)
    selection = select_backend(requested, allow_fallback, probe, kind)
    if selection.fell_back:
        options = _without_gpu_options(options, selection.backend)
    runner = _build(model, kind, selection.backend, options)
    runner.selection = selection
    return runner


def _check_io(io: str | None, inputs: dict[str, Any], model: Any) -> None:
    """A feature dtype asked of a graph must be the one it was exported with (a graph's input dtype is fixed)."""
    from ..data import FEATURE_DTYPES

    if io is None:
        return
    if io not in FEATURE_DTYPES:
        raise ConfigError(f"unknown feature dtype {io!r}; expected one of: {', '.join(FEATURE_DTYPES)}")
    have = {spec.dtype for spec in inputs.values() if spec.dtype.startswith("float")}
    if have and have != {np.dtype(FEATURE_DTYPES[io]).name}:
        exported = "fp16" if have == {"float16"} else "fp32"
        raise ConfigError(f"{model} takes {exported} features (its input dtype is fixed at export); export it with "
                          f"{option_value('io_dtype', io, '--io')} to take {io} features")  # fmt: skip


def _build(model: Any, kind: str, name: str, o: RunnerOptions) -> Runner:
    if name in ("torch", "torch-cuda"):
        from .torch_runner import TorchRunner

        device = f"cuda:{o.device}" if name == "torch-cuda" else "cpu"
        precision = o.precision or "fp32"
        return TorchRunner(model, device=device, precision=precision, compile=o.compile, graph=o.torch_graph,
                           tf32=o.tf32, io=o.io or "fp32")  # fmt: skip
    if kind == "plan":
        from .trt import TrtRunner

        runner = TrtRunner(model, device_id=o.device)
        _check_io(o.io, runner.get_input_metadata(), model)
        return runner
    info, inputs = read_onnx(model)
    _check_io(o.io, inputs, model)
    precision = onnx_precision(model, info, o.precision, name)
    if name == "tensorrt":
        return _tensorrt_from_onnx(model, info, inputs, precision, o)
    from .ort import OrtRunner, cuda_provider_options, trt_provider_options

    providers: list[Any] = [CPU]
    cuda_graph = bool(o.cuda_graph) if o.cuda_graph is not None else name == "ort-cuda"
    if name == "ort-cuda":
        providers = [(CUDA, cuda_provider_options(o.device, cuda_graph, o.tf32)), CPU]
    elif name == "ort-trt":
        cache = ort_trt_cache_dir(model, inputs, precision, o)
        trt_options = trt_provider_options(
            cache, _profile(inputs, o), precision == "fp16", o.device, cuda_graph=cuda_graph
        )
        providers = [(TRT, trt_options), (CUDA, cuda_provider_options(o.device, tf32=o.tf32)), CPU]
    runner = OrtRunner(model, name, info, providers, o.device, o.threads, cuda_graph, batch_size=o.batch_size)
    if info is not None:
        info.precision = "tf32" if o.tf32 and precision == "fp32" else precision
    return runner


def onnx_precision(model: Any, info: ModelInfo | None, precision: str | None, backend: str) -> str:
    """The precision an exported graph runs at on ``backend``: ``precision``, or the graph's own by default (``fp32``
    for a graph deepspot did not export). onnxruntime's own backends run a graph as exported.

    Raises:
        ConfigError: Another precision than the graph's on ``ort-cpu`` or ``ort-cuda``.
    """
    exported = info.precision if info is not None else "fp32"
    precision = precision or exported
    if backend in ("ort-cpu", "ort-cuda") and precision != exported:
        raise ConfigError(
            f"{model} was exported at {exported}; onnxruntime runs it as exported, so export it with "
            f"{option_value('precision', precision)} (or use ort-trt / tensorrt, which can lower the precision)"
        )
    return precision


def _without_gpu_options(o: RunnerOptions, backend: str) -> RunnerOptions:
    """The options for a backend fallen back to: the GPU's math mode and graph replay, asked of the GPU backend, are
    left out where the fallback cannot take them (a run that may fall back must not fail for having asked), with a
    warning that says so."""
    dropped = {"tf32": o.tf32 and backend in ("torch", "ort-cpu"),
               "cuda_graph": o.cuda_graph and backend not in ("ort-cuda", "ort-trt")}  # fmt: skip
    names = [option(name) for name, drop in dropped.items() if drop]
    if not names:
        return o
    warnings.warn(f"{' and '.join(names)} {'does' if len(names) == 1 else 'do'} not apply on {backend}; running "
                  "without", FallbackWarning, stacklevel=3)  # fmt: skip
    return replace(o, tf32=o.tf32 and not dropped["tf32"], cuda_graph=o.cuda_graph and not dropped["cuda_graph"])


def check_gpu_options(o: RunnerOptions, backend: str) -> None:
    """Refuse GPU options a backend would ignore."""
    if o.tf32 and backend in ("torch", "ort-cpu"):
        raise ConfigError(f"tf32 is a math mode of NVIDIA GPUs; the {backend} backend runs on the CPU")
    if o.cuda_graph and backend not in ("ort-cuda", "ort-trt"):
        raise ConfigError(
            f"CUDA graphs are replayed by the onnxruntime GPU backends (ort-cuda, ort-trt), not {backend}"
        )


def _profile(inputs, o: RunnerOptions):
    from .profiles import derive_profile

    return derive_profile(inputs, o.batch_size, o.bag_sizes)


def ort_trt_cache_dir(onnx_path: str | Path, inputs, precision: str, o: RunnerOptions) -> Path:
    """Engine cache folder for onnxruntime's TensorRT provider: one per graph, profile and precision."""
    from ..fileio import file_sha256 as file_hash
    from .profiles import cache_key

    key = cache_key(onnx=file_hash(onnx_path), profile=_profile(inputs, o).to_dict(), precision=precision)
    path = (o.cache_dir or default_cache_dir()) / "ort-trt" / f"{Path(onnx_path).stem}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tensorrt_from_onnx(onnx_path, info, inputs, precision: str, o: RunnerOptions) -> Runner:
    """Build (or reuse from the cache) a native engine for an ONNX file, then run it."""
    from ..fileio import file_sha256 as file_hash
    from .profiles import cache_key
    from .trt import TrtRunner, engine_from_onnx, gpu_identity, import_trt

    trt = import_trt()
    sha = file_hash(onnx_path)
    key = cache_key(
        onnx=sha,
        profile=_profile(inputs, o).to_dict(),
        precision=precision,
        tf32=o.tf32,
        trt=trt.__version__,
        **gpu_identity(o.device),
    )
    folder = (o.cache_dir or default_cache_dir()) / "tensorrt"
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / f"{Path(onnx_path).stem}-{key}.plan"
    if not plan.is_file():
        log.info("building a TensorRT engine for %s into %s", onnx_path, plan)
        engine_from_onnx(
            onnx_path, plan, precision, o.batch_size, o.bag_sizes, o.device, timing_cache=folder / "timing.cache",
            tf32=o.tf32,
        )
    return TrtRunner(plan, device_id=o.device, onnx_path=onnx_path)
