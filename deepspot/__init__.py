"""DeepSpot and DeepCell: spatial gene expression from H&E features, from training to high-throughput inference.

``import deepspot`` needs no PyTorch: ``load``, ``save`` and ``create_model`` import it when first used, so that a
serving install (``pip install 'deepspot[cpu]'``) runs exported models without it.
"""

from ._version import __version__
from .errors import DeepSpotError

_LAZY = {"load": "checkpoint", "save": "checkpoint", "create_model": "factory"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "create_model", "load", "save", "DeepSpotError"]
