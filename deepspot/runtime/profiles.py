"""Optimisation profiles and cache keys for TensorRT (native and through onnxruntime's provider).

Pure functions, so that they are tested on machines without a GPU. TensorRT compiles one kernel plan per range
of shapes: the batch axis runs from 1 (the last, short batch of a stream) to the batch size, and each bag axis is
pinned to the sizes found in the data, because a narrow range gives faster kernels and a bundle's bags all share
one size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import TensorSpec

# Bag axes with no size from data: wide enough for the reference's bags (9 sub-spots, 6 or 44 neighbours).
DEFAULT_BAG_RANGE = (1, 16, 64)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """Min, opt and max shape of every input: one TensorRT optimisation profile."""

    min: dict[str, Shape]
    opt: dict[str, Shape]
    max: dict[str, Shape]

    def names(self) -> tuple[str, ...]:
        return tuple(self.min)

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    def covers(self, shapes: Mapping[str, Shape]) -> bool:
        """Whether every input shape lies within ``[min, max]`` on every axis."""
        for name, shape in shapes.items():
            lo, hi = self.min.get(name), self.max.get(name)
            if lo is None or len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                return False
        return True


def bag_sizes_of(inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The bag size (axis 1) of every 3-D input: ``{"subspot": 9, "neighbors": 6, "spot": 1}``."""
    return {name: int(a.shape[1]) for name, a in inputs.items() if np.ndim(a) == 3}


def derive_profile(
    specs: Mapping[str, TensorSpec],
    batch_size: int,
    bag_sizes: Mapping[str, int | tuple[int, int, int]] | None = None,
    min_batch: int = 1,
) -> Profile:
    """One optimisation profile for a graph's inputs.

    Args:
        specs: The graph's inputs; axis 0 is the batch axis, fixed axes keep their size.
        batch_size: Largest (and most common) batch: the profile's opt and max.
        bag_sizes: Per input, the size of its dynamic axis 1: an int pins it (min = opt = max), a triple gives a
            range. Inputs without one get :data:`DEFAULT_BAG_RANGE`.
        min_batch: Smallest batch the profile accepts.
    """
    if batch_size < 1 or not 1 <= min_batch <= batch_size:
        raise ConfigError(f"need 1 <= min batch ({min_batch}) <= batch size ({batch_size})")
    bag_sizes = dict(bag_sizes or {})
    lo: dict[str, Shape] = {}
    opt: dict[str, Shape] = {}
    hi: dict[str, Shape] = {}
    for name, spec in specs.items():
        dims = ([], [], [])
        for axis, size in enumerate(spec.shape):
            if axis == 0:
                triple = (min_batch, batch_size, batch_size)
            elif not spec.is_dynamic(axis):
                triple = (int(size),) * 3
            else:
                given = bag_sizes.get(name, DEFAULT_BAG_RANGE)
                triple = (int(given),) * 3 if isinstance(given, (int, np.integer)) else tuple(int(g) for g in given)
                if len(triple) != 3 or not 1 <= triple[0] <= triple[1] <= triple[2]:
                    raise ConfigError(f"bag size range of {name!r} must be 1 <= min <= opt <= max, got {given}")
            for d, v in zip(dims, triple):
                d.append(v)
        lo[name], opt[name], hi[name] = (tuple(d) for d in dims)
    return Profile(lo, opt, hi)


def _shapes_string(shapes: Mapping[str, Shape]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def trt_profile_options(profile: Profile) -> dict[str, str]:
    """The profile as onnxruntime's TensorRT provider options (``spot:1x1x1024,subspot:1x9x1024``)."""
    return {
        "trt_profile_min_shapes": _shapes_string(profile.min),
        "trt_profile_opt_shapes": _shapes_string(profile.opt),
        "trt_profile_max_shapes": _shapes_string(profile.max),
    }


def cache_key(**parts: Any) -> str:
    """A short, stable hash of everything an engine depends on (graph hash, profile, precision, GPU, versions)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
