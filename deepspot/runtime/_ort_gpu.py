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
