"""Checks of the metadata a model file carries about itself (gene names, scaler arrays, sizes), without PyTorch.

Checkpoints, ONNX graphs, indexed exports and TensorRT plans all carry the same kinds of metadata, written by
deepspot but possibly crafted by anyone. Each value is checked here before it is used, so a wrong type or an
absurd size is one :class:`~deepspot.errors.CheckpointError` naming the file, never a traceback or an allocation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import CheckpointError

#: Largest feature size or gene count a model may declare (the largest real panels are ~40,000 genes).
MAX_SIZE = 1 << 20


#: Deepest nesting of lists and mappings in a model file's JSON metadata (deepspot writes 3 levels at most): deeper
#: values would overflow the stack of whatever walks them later (a copy, a comparison).
MAX_JSON_DEPTH = 32


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether lists and mappings in ``value`` (decoded JSON) nest more than ``limit`` levels deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, Mapping)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, Mapping) else item))
    return False


def check_size(value: Any, name: str, source: str, limit: int = MAX_SIZE) -> int:
    """A positive integer no larger than ``limit`` (an integral float as JSON may write it, or the decimal string that
    ONNX ``metadata_props`` hold, is accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.isdigit() and len(value) <= 12:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        shown = repr(value)[:40] if isinstance(value, (int, float, str)) else type(value).__name__
        raise CheckpointError(f"{source}: {name} must be an integer from 1 to {limit}, got {shown}")
    return value


def check_genes(genes: Any, source: str, count: int | None = None) -> list[str] | None:
    """Gene names: ``None`` or a list of strings, ``count`` of them where the model's output size is known."""
    if genes is None:
        return None
    if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
        raise CheckpointError(f"{source}: the gene names are not a list of strings")
    if count is not None and len(genes) != count:
        raise CheckpointError(f"{source}: {len(genes)} gene names for {count} outputs")
    return genes


def _finite_numbers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def check_scaler(scaler: Any, source: str, count: int | None = None):
    """A :class:`~deepspot.scaler.Scaler` from its dict form (``kind``, ``offset``, ``scale``), or ``None``."""
    from .scaler import Scaler

    if scaler is None or isinstance(scaler, Scaler):
        return scaler
    if not isinstance(scaler, Mapping) or not isinstance(scaler.get("kind"), str):
        raise CheckpointError(f"{source}: the scaler is not a mapping with a kind")
    for key in ("offset", "scale"):
        values = scaler.get(key)
        if values is not None and not _finite_numbers(values):
            raise CheckpointError(f"{source}: the scaler's {key} is not a list of finite numbers")
        if values is not None and count is not None and len(values) != count:
            raise CheckpointError(f"{source}: the scaler's {key} has {len(values)} values for {count} genes")
    try:
        return Scaler.from_dict(dict(scaler))
    except (ValueError, TypeError, KeyError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{source}: unusable scaler ({e})") from None


__all__ = ["MAX_SIZE", "check_genes", "check_scaler", "check_size"]
