"""The ``torch`` backend: the PyTorch model itself, eager or compiled, on the CPU or CUDA.

It is the reference that parity compares every other backend with, and a backend in its own right (``torch`` on
the CPU, ``torch-cuda`` on a GPU).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..checks import PRECISIONS
from ..data import FEATURE_DTYPES
from ..errors import BackendUnavailableError, ConfigError
from .base import OUTPUT_NAME, ModelInfo, Runner, TensorSpec

CASTS = ("auto", "autocast", "half")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(model_or_path):
    """A model in eval mode from a model or a checkpoint path (``.safetensors`` or a reference file)."""
    if isinstance(model_or_path, (str, Path)):
        from ..checkpoint import load

        return load(model_or_path)
    return model_or_path.eval()


class TorchRunner(Runner):
    """Runs a :class:`~deepspot.base.DeepSetModel` (or its export-ready module) with PyTorch.

    Args:
        model: A model or a checkpoint path.
        device: ``cpu``, ``cuda`` or ``cuda:K``.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        cast: How a reduced precision is applied to the eager model: ``autocast`` (weights stay fp32, matrix products
            run in the low precision), ``half`` (weights and inputs converted), or ``auto`` (``half`` on CUDA for
            fp16, else ``autocast``). The ``export`` graph is built at the precision and ignores it.
        compile: Wrap the module in ``torch.compile`` (dynamic shapes), compiled on the first call.
        graph: ``eager`` runs the model as written (the reference); ``export`` runs the exporter's optimised module
            (fused Phi ensemble, folded Rho), which is what the ONNX graphs compute.
        name: Runner name in reports.
        tf32: On CUDA, let fp32 matrix products use TF32 tensor cores while the runner is active (PyTorch's
            process-wide switch, set on :meth:`activate` and restored on :meth:`deactivate`).
        io: The features' dtype as the runner takes them: ``fp32``, or ``fp16`` (fp16 features cross the bus as
            they are, half the bytes, and are cast to the compute dtype on the device), as an ONNX graph exported
            with ``--io fp16`` takes them.
    """

    backend = "torch"

    def __init__(
        self,
        model,
        device: str = "cpu",
        precision: str = "fp32",
        cast: str = "auto",
        compile: bool = False,
        graph: str = "eager",
        name: str | None = None,
        tf32: bool = False,
        io: str = "fp32",
    ):
        if io not in FEATURE_DTYPES:
            raise ConfigError(f"unknown feature dtype {io!r}; expected one of: {', '.join(FEATURE_DTYPES)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
        if cast not in CASTS:
            raise ConfigError(f"unknown cast {cast!r}; expected one of: {', '.join(CASTS)}")
        if graph not in ("eager", "export"):
            raise ConfigError(f"unknown graph {graph!r}; expected eager or export")
        self.model = load_model(model)
        source = str(model) if isinstance(model, (str, Path)) else ""
        super().__init__(ModelInfo.from_model(self.model, source=source, precision=precision), name)
        self._device = torch.device(device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "the torch-cuda backend needs an NVIDIA GPU and a CUDA build of PyTorch; "
                "torch.cuda.is_available() is False"
            )
        self.backend = "torch-cuda" if self._device.type == "cuda" else "torch"
        self.name = name or self.backend
        self.precision = precision
        if tf32 and self._device.type != "cuda":
            raise ConfigError("tf32 is a math mode of NVIDIA GPUs; this runner is on the CPU")
        self.tf32 = tf32
        self._tf32_before: bool | None = None
        if tf32 and precision == "fp32":
            self.info.precision = "tf32"  # the parity tolerance and the reports follow the math that runs
        if graph == "export":
            # The exporter's module casts its weights and compute itself, with fp32 inputs and outputs.
            self.cast = "module"
        elif cast == "auto":
            self.cast = "half" if self._device.type == "cuda" and precision == "fp16" else "autocast"
        else:
            self.cast = cast
        self.compile = compile
        self.graph = graph
        self._module = None
        self.io = io
        dtype = np.dtype(FEATURE_DTYPES[io]).name
        self._specs = {k: replace(v, dtype=dtype) for k, v in self.info.input_specs().items()}
        self._pinned: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (OUTPUT_NAME,)

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        return self._specs

    def activate_impl(self) -> None:
        if self.graph == "export":
            from ..export import build_export_module

            module = build_export_module(self.model, precision=self.precision)
        else:
            # A copy, so that moving or casting never changes the caller's model.
            module = copy.deepcopy(self.model)
        module = module.eval().to(self._device)
        if self.precision != "fp32" and self.cast == "half":
            module = module.to(_DTYPES[self.precision])
        if self.compile:
            module = torch.compile(module, dynamic=True)
        self._module = module
        if self.tf32:
            self._tf32_before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def deactivate_impl(self) -> None:
        if self._tf32_before is not None:
            torch.backends.cuda.matmul.allow_tf32 = self._tf32_before
            self._tf32_before = None
        self._module = None
        self._pinned.clear()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _autocast(self):
        if self.precision == "fp32" or self.cast != "autocast":
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=_DTYPES[self.precision])

    def _to_device(self, name: str, a: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():
            # Feeds may be read-only views of a memory-mapped bundle; the model never writes to its inputs.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(a)
        if self._device.type == "cuda":
            # Page-locked staging buffer, reused between calls: the copy to the GPU can then run asynchronously.
            buf = self._pinned.get(name)
            if buf is None or buf.numel() < t.numel():
                buf = self._pinned[name] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
            staged = buf[: t.numel()].view(t.shape)
            staged.copy_(t)
            t = staged.to(self._device, non_blocking=True)
        return self._compute_dtype(t)

    def _compute_dtype(self, t: torch.Tensor) -> torch.Tensor:
        """Features on the device, in the dtype the module computes with (fp16 features made fp32 for an fp32 or
        autocast module; any features made half for a half module)."""
        if self.precision != "fp32" and self.cast == "half":
            return t.to(_DTYPES[self.precision])
        return t if t.dtype == torch.float32 else t.float()

    def pipeline_adapter(self, batch_size: int):
        if self._device.type != "cuda" or not self.is_active:
            return None
        outputs = {OUTPUT_NAME: ((self.info.output_size,), np.dtype(np.float32))}
        return TorchCudaAdapter(self._device, self._forward, outputs), _pinned_allocate

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model on device tensors (the pipeline's compute step)."""
        with self._autocast():
            inputs = {k: self._compute_dtype(t) for k, t in inputs.items()}
            return {OUTPUT_NAME: self._module(**inputs).float()}

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), self._autocast():
            inputs = {name: self._to_device(name, a) for name, a in feed.items()}
            y = self._module(**inputs)
        # .cpu() waits for the GPU, so the pinned buffers are free again when this returns.
        return {OUTPUT_NAME: y.float().cpu().numpy()}


def _pinned_allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A page-locked host buffer (a copy from it to the GPU is one asynchronous DMA)."""
    return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), pin_memory=True).numpy()


class TorchCudaAdapter:
    """The ``torch-cuda`` side of :func:`~deepspot.runtime.pipeline.run_pipeline`: the copy of a batch to the GPU
    on a copy stream, the model on a compute stream that waits for it (on the GPU, not the host), the copy back
    into the slot's page-locked output buffer on a third stream, so that the three overlap across batches.

    Args:
        device: The GPU.
        forward: ``{name: device tensor} -> {name: float32 device tensor}``: the runner's compute step.
        outputs: Per output, the shape of one item and the dtype (float32).
    """

    ring = None  # each call's ring: PyTorch's caching host allocator keeps the pinned pages for the next

    def __init__(self, device, forward, outputs):
        self.device, self.forward, self._outputs = device, forward, outputs
        self.upload, self.compute, self.download = (torch.cuda.Stream(device) for _ in range(3))

    def output_specs(self):
        return self._outputs

    def submit(self, slot):
        with torch.cuda.stream(self.upload):
            inputs = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in slot.feed.items()}
            uploaded = torch.cuda.Event()
            uploaded.record(self.upload)
        with torch.cuda.stream(self.compute), torch.inference_mode():
            self.compute.wait_event(uploaded)
            for t in inputs.values():
                t.record_stream(self.compute)  # allocated on the upload stream, used here
            outputs = self.forward(inputs)
            computed = torch.cuda.Event()
            computed.record(self.compute)
        with torch.cuda.stream(self.download):
            self.download.wait_event(computed)
            for name, y in outputs.items():
                y.record_stream(self.download)
                host = slot.result[name]
                torch.from_numpy(host).copy_(y[: host.shape[0]], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.download)
        return done

    def wait(self, handle) -> None:
        handle.synchronize()
