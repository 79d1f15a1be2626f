"""The target scaler, as plain arrays.

The reference stores a fitted scikit-learn ``StandardScaler`` (or ``RobustScaler``) in the model. Here it is a small
dataclass with the same ``inverse_transform``, so that nothing needs scikit-learn and checkpoints stay pickle-free.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

KINDS = ("standard", "robust")


@dataclass
class Scaler:
    """``inverse_transform(x) = x * scale + offset``.

    Attributes:
        kind: ``standard`` (offset is sklearn's ``mean_``) or ``robust`` (offset is ``center_``).
        offset: Per-gene offset, ``(G,)`` float64; may be ``None`` when the scaler did not centre.
        scale: Per-gene scale, ``(G,)`` float64; may be ``None`` when the scaler did not scale.
    """

    kind: str
    offset: np.ndarray | None
    scale: np.ndarray | None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown scaler kind {self.kind!r}; expected one of: {', '.join(KINDS)}")
        self.offset = None if self.offset is None else np.asarray(self.offset, dtype=np.float64).reshape(-1)
        self.scale = None if self.scale is None else np.asarray(self.scale, dtype=np.float64).reshape(-1)

    @property
    def n_features(self) -> int | None:
        ref = self.offset if self.offset is not None else self.scale
        return None if ref is None else int(ref.shape[0])

    @classmethod
    def fit(cls, targets: np.ndarray) -> "Scaler":
        """Fit a standard scaler as scikit-learn does (population std; a zero std becomes 1)."""
        y = np.asarray(targets, dtype=np.float64)
        mean = y.mean(axis=0)
        std = y.std(axis=0)
        std[std < 10 * np.finfo(np.float64).eps] = 1.0
        return cls("standard", mean, std)

    @classmethod
    def from_object(cls, obj: Any) -> "Scaler | None":
        """Convert ``None``, a :class:`Scaler`, a dict or a fitted sklearn-like scaler."""
        if obj is None or isinstance(obj, Scaler):
            return obj
        if isinstance(obj, dict):
            return cls.from_dict(obj)
        if hasattr(obj, "center_"):
            return cls("robust", obj.center_, getattr(obj, "scale_", None))
        if hasattr(obj, "mean_") or hasattr(obj, "scale_"):
            return cls("standard", getattr(obj, "mean_", None), getattr(obj, "scale_", None))
        raise ConfigError(f"cannot use {type(obj).__name__} as a scaler: it has no mean_/center_ or scale_")

    def transform(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float64)
        if self.offset is not None:
            y = y - self.offset
        if self.scale is not None:
            y = y / self.scale
        return y.astype(np.asarray(x).dtype, copy=False)

    def inverse_transform(self, x):
        """``x * scale + offset`` for a NumPy array or a torch tensor, keeping the input's type and dtype."""
        torch = sys.modules.get("torch")  # a tensor exists only where torch is imported: the runtime needs no torch
        if torch is not None and isinstance(x, torch.Tensor):
            y = x
            if self.scale is not None:
                y = y * torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
            if self.offset is not None:
                y = y + torch.as_tensor(self.offset, dtype=x.dtype, device=x.device)
            return y
        arr = np.asarray(x)
        y = arr.astype(np.float64)
        if self.scale is not None:
            y = y * self.scale
        if self.offset is not None:
            y = y + self.offset
        return y.astype(arr.dtype if arr.dtype.kind == "f" else np.float64, copy=False)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "offset": None if self.offset is None else self.offset.tolist(),
            "scale": None if self.scale is None else self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(d["kind"], d.get("offset"), d.get("scale"))
