"""Page-locked host staging shared by the GPU backends (onnxruntime with IO binding, native TensorRT)."""

from __future__ import annotations

import numpy as np


class PinnedPool:
    """Page-locked host buffers by name, grown on demand and reused.

    A copy from pageable memory goes through a driver bounce buffer; from pinned memory it is one DMA transfer.
    PyTorch allocates the pinned pages (it is a dependency anyway); without a CUDA build of PyTorch the pool hands
    out ordinary NumPy buffers, which work, only slower.
    """

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}
        try:
            import torch

            self._pin = torch.cuda.is_available()
        except ImportError:
            self._pin = False

    def _alloc(self, size: int, dtype: np.dtype) -> np.ndarray:
        if self._pin:
            import torch

            return torch.empty(size, dtype=getattr(torch, np.dtype(dtype).name), pin_memory=True).numpy()
        return np.empty(size, dtype=dtype)

    def stage(self, name: str, a: np.ndarray, rows: int | None = None) -> np.ndarray:
        """Copy ``a`` into the pinned buffer of ``name``, zero-padded to ``rows`` rows if given."""
        rows = a.shape[0] if rows is None else rows
        shape = (rows,) + a.shape[1:]
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != a.dtype:
            buf = self._buffers[name] = self._alloc(size, a.dtype)
        view = buf[:size].reshape(shape)
        view[: a.shape[0]] = a
        if rows > a.shape[0]:
            view[a.shape[0] :] = 0  # padding rows: finite, and independent of the real rows
        return view
