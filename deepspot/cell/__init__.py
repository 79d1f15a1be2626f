"""The DeepCell family."""

from .model import DeepCell

__all__ = ["DeepCell"]
