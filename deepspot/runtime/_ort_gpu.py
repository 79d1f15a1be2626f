"""IO binding for onnxruntime on a GPU: page-locked staging, device-resident outputs, optional CUDA graph replay.

Only imported by :class:`~deepspot.runtime.ort.OrtRunner` on the ``ort-cuda`` and ``ort-trt`` backends.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._cuda import PinnedPool
from ._onnxruntime import import_ort
from .base import TensorSpec


class DeviceIO:
    """Binds a session's inputs and outputs to GPU memory and runs it with ``run_with_iobinding``.

    Args:
        session: An ``InferenceSession`` on the CUDA or TensorRT provider.
        inputs: The graph's input specs.
        outputs: The graph's output specs.
        device_id: The GPU.
        fixed_buffers: Fixed-address buffers, as CUDA graph replay needs; the first batch fixes every shape and shorter
            batches are zero-padded.
        device_type: ``cuda``; ``cpu`` runs the same binding logic on the CPU provider (that is how it is tested on
            machines without a GPU).
    """

    def __init__(
        self,
        session,
        inputs: dict[str, TensorSpec],
        outputs: dict[str, TensorSpec],
        device_id: int,
        fixed_buffers: bool,
        device_type: str = "cuda",
    ):
        self.ort = import_ort()
        self.session = session
        self.inputs, self.outputs = inputs, outputs
        self.device_id = device_id
        self.fixed_buffers = fixed_buffers
        self.device_type = device_type
        self.binding = session.io_binding()
        self.pinned = PinnedPool()
        self._fixed_in: dict[str, object] | None = None
        self._fixed_out: dict[str, object] = {}

    def _device_value(self, host: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id)

    def _bind_fixed(self, feed: dict[str, np.ndarray]) -> None:
        # The first batch decides the captured shapes. Outputs get fixed buffers before the first run, because
        # onnxruntime may capture the graph on that run and later runs must find every buffer where it was.
        rows = next(iter(feed.values())).shape[0]
        self._fixed_in = {name: self._device_value(self.pinned.stage(name, a)) for name, a in feed.items()}
        for name, value in self._fixed_in.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, spec in self.outputs.items():
            if not all(isinstance(d, int) for d in spec.shape[1:]):
                raise InputError(f"a CUDA graph needs fixed output sizes; {name} has shape {spec.shape}")
            shape = (rows,) + tuple(spec.shape[1:])
            dtype = np.dtype(spec.dtype)
            fixed = self.ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device_type, self.device_id)
            self._fixed_out[name] = fixed
            self.binding.bind_ortvalue_output(name, fixed)

    def run(self, feed: dict[str, np.ndarray], to_host: bool = True) -> dict:
        n = next(iter(feed.values())).shape[0]
        if self.fixed_buffers:
            if self._fixed_in is None:
                self._bind_fixed(feed)
            rows = next(iter(self._fixed_in.values())).shape()[0]
            for name, a in feed.items():
                fixed = self._fixed_in[name]
                if n > rows or tuple(a.shape[1:]) != tuple(fixed.shape()[1:]):
                    raise InputError(
                        f"CUDA graph captured for {name} {tuple(fixed.shape())}; got {a.shape} (rebuild the runner)"
                    )
                fixed.update_inplace(self.pinned.stage(name, a, rows=rows))  # same address: the graph stays valid
            self.session.run_with_iobinding(self.binding)
            values = [self._fixed_out[name] for name in self.outputs]
        else:
            for name, a in feed.items():
                self.binding.bind_ortvalue_input(name, self._device_value(self.pinned.stage(name, a)))
            for name in self.outputs:
                self.binding.bind_output(name, self.device_type, self.device_id)
            self.session.run_with_iobinding(self.binding)
            values = self.binding.get_outputs()
        if not to_host:
            return dict(zip(self.outputs, values))
        # Only the real rows, and always a copy: with fixed buffers the next batch overwrites these.
        return {name: np.array(v.numpy()[:n], dtype=np.float32) for name, v in zip(self.outputs, values)}


class OrtCudaAdapter:
    """The ``ort-cuda`` side of :func:`~deepspot.runtime.pipeline.run_pipeline`, with the CUDA runtime through
    ``ctypes`` (no PyTorch): each slot has device buffers bound to its own IO binding; its host-to-device copy runs
    on an upload stream, onnxruntime runs on the session's compute stream (``user_compute_stream``) after an event,
    and the copy back into the slot's page-locked output buffer on a download stream.

    With ``cuda_graph`` the graph's inputs and outputs live in one fixed set of device buffers (a captured graph
    replays on fixed addresses); each batch is copied into them and out of them on the device, and every batch has
    the full batch size (the pipeline pads the last one).

    Unverified: written against the CUDA runtime and onnxruntime documentation; it has not run on a GPU yet.
    """

    D2D = 3  # cudaMemcpyDeviceToDevice

    def __init__(self, runner, cuda, compute_stream: int):
        self.ort = import_ort()
        self.runner = runner
        self.cuda = cuda
        self.compute = compute_stream
        self.upload, self.download = cuda.stream(), cuda.stream()
        self.run_options = self.ort.RunOptions()
        # run_with_iobinding would otherwise wait for the GPU before returning; the events below do the waiting.
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._slots: dict[int, dict] = {}
        self._fixed: dict | None = None

    def output_specs(self):
        g = self.runner.info.output_size
        return {name: ((g,), np.dtype(spec.dtype)) for name, spec in self.runner._outputs.items()}

    def _device(self, shape, dtype):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", self.runner.device_id)

    def _buffers(self, slot) -> dict:
        shapes = {k: (v.shape, v.dtype) for k, v in {**slot.feed, **slot.result}.items()}
        state = self._slots.get(slot.index)
        if state is None or state["shapes"] != shapes:  # a slot's buffers are reused while its shapes stay
            state = {
                "shapes": shapes,
                "in": {k: self._device(a.shape, a.dtype) for k, a in slot.feed.items()},
                "out": {k: self._device(a.shape, a.dtype) for k, a in slot.result.items()},
                "events": [self.cuda.event() for _ in range(3)],
            }
            state["binding"] = self._bind(state["in"], state["out"]) if not self.runner.cuda_graph else None
            self._slots[slot.index] = state
        return state

    def _bind(self, inputs: dict, outputs: dict):
        binding = self.runner.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        return binding

    def submit(self, slot):
        cuda = self.cuda
        state = self._buffers(slot)
        uploaded, computed, done = state["events"]
        for name, host in slot.feed.items():
            cuda.copy_async(state["in"][name].data_ptr(), host.ctypes.data, host.nbytes, cuda.H2D, self.upload)
        cuda.record(uploaded, self.upload)
        cuda.wait_event(self.compute, uploaded)
        if self.runner.cuda_graph:
            if self._fixed is None:  # the captured graph's buffers: allocated once, bound once
                fixed_in = {k: self._device(a.shape(), slot.feed[k].dtype) for k, a in state["in"].items()}
                fixed_out = {k: self._device(a.shape(), slot.result[k].dtype) for k, a in state["out"].items()}
                self._fixed = {"in": fixed_in, "out": fixed_out, "binding": self._bind(fixed_in, fixed_out)}
            for name, value in state["in"].items():
                nbytes = slot.feed[name].nbytes
                cuda.copy_async(self._fixed["in"][name].data_ptr(), value.data_ptr(), nbytes, self.D2D, self.compute)
            self.runner.session.run_with_iobinding(self._fixed["binding"], self.run_options)
            for name, value in state["out"].items():
                nbytes = slot.result[name].nbytes
                cuda.copy_async(value.data_ptr(), self._fixed["out"][name].data_ptr(), nbytes, self.D2D, self.compute)
        else:
            self.runner.session.run_with_iobinding(state["binding"], self.run_options)
        cuda.record(computed, self.compute)
        cuda.wait_event(self.download, computed)
        for name, host in slot.result.items():
            cuda.copy_async(host.ctypes.data, state["out"][name].data_ptr(), host.nbytes, cuda.D2H, self.download)
        cuda.record(done, self.download)
        return done

    def wait(self, handle) -> None:
        self.cuda.synchronize(handle)


def pinned_allocator(cuda, keep: list):
    """Page-locked host buffers from ``cudaHostAlloc`` as NumPy arrays; ``keep`` holds the pointers to free."""
    import ctypes

    def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = cuda.host_alloc(nbytes)
        keep.append(ptr)
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr.value)
        return np.frombuffer(raw, dtype=np.uint8)[:nbytes].view(dtype).reshape(shape)

    return allocate
