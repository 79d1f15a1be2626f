"""DeepSpot and DeepCell: spatial gene expression from H&E features, from training to high-throughput inference.

``import deepspot`` is light: PyTorch and the model code load on first use of :func:`create_model`, :func:`load` or
:func:`save`, so that the command line starts fast and running exported models does not need them.
"""

from ._version import __version__
from .errors import DeepSpotError

_LAZY = {"create_model": "factory", "load": "checkpoint", "save": "checkpoint"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'deepspot' has no attribute {name!r}")


__all__ = ["__version__", "create_model", "load", "save", "DeepSpotError"]
