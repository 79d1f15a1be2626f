"""Importing onnxruntime, or saying what to install: shared by the session builder (``ort``) and the GPU IO binding
(``_ort_gpu``), so that neither imports the other."""

from __future__ import annotations

from ..errors import BackendUnavailableError


def import_ort():
    """``onnxruntime``, or an error that says what to install."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "onnxruntime is not installed: pip install 'deepspot[cpu]' (or 'deepspot[gpu]' on a GPU server)"
        ) from None
    return onnxruntime
