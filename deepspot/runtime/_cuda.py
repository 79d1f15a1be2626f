"""Page-locked host staging shared by the GPU backends (onnxruntime with IO binding, native TensorRT)."""

from __future__ import annotations

import numpy as np


def pinned_array(cuda, shape: tuple[int, ...], dtype, keep: list) -> np.ndarray:
    """Page-locked host memory from ``cudaHostAlloc`` as a NumPy array of ``shape``; the pointer goes into ``keep``,
    for ``cuda.free_host`` once nothing uses the array."""
    import ctypes

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    ptr = cuda.host_alloc(nbytes)
    keep.append(ptr)
    raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr.value)
    return np.frombuffer(raw, dtype=np.uint8)[:nbytes].view(dtype).reshape(shape)


class PinnedPool:
    """Page-locked host buffers by name, grown on demand and reused.

    A copy from pageable memory goes through a driver bounce buffer; from pinned memory it is one DMA transfer.
    Given the CUDA runtime (:class:`~deepspot.runtime.cuda_libs.CudaRuntime`, as ``ort-cuda`` has it), the pages come
    from ``cudaHostAlloc`` and :meth:`close` frees them: no PyTorch needed. Otherwise PyTorch allocates them where it
    has CUDA, and without either the pool hands out ordinary NumPy buffers, which work, only slower.
    """

    def __init__(self, cuda=None):
        self._buffers: dict[str, np.ndarray] = {}
        self._cuda = cuda
        self._pointers: list = []
        self._pin = False
        if cuda is None:
            try:
                import torch

                self._pin = torch.cuda.is_available()
            except ImportError:
                pass

    def close(self) -> None:
        """Free the pages from ``cudaHostAlloc`` (the buffers handed out must no longer be used)."""
        self._buffers = {}
        for ptr in self._pointers:
            self._cuda.free_host(ptr)
        self._pointers = []

    def _alloc(self, size: int, dtype: np.dtype) -> np.ndarray:
        if self._cuda is not None:
            return pinned_array(self._cuda, (size,), dtype, self._pointers)
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
