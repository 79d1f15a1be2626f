"""DeepSpot and DeepCell: spatial gene expression from H&E features, from training to high-throughput inference."""

from ._version import __version__
from .checkpoint import load, save
from .errors import DeepSpotError
from .factory import create_model

__all__ = ["__version__", "create_model", "load", "save", "DeepSpotError"]
