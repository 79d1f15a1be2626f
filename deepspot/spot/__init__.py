"""The DeepSpot family."""

from .model import DeepSpot

__all__ = ["DeepSpot"]
