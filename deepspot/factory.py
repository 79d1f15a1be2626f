"""One entry point to build a model of either family."""

from __future__ import annotations

from typing import Any

from .base import DeepSetModel
from .modes import check_family, get_mode


def model_class(family: str) -> type[DeepSetModel]:
    check_family(family)
    if family == "spot":
        from .spot import DeepSpot

        return DeepSpot
    from .cell import DeepCell

    return DeepCell


def create_model(family: str, mode: str | None = None, **kwargs: Any) -> DeepSetModel:
    """Build a DeepSpot (``family="spot"``) or DeepCell (``"cell"``) from constructor arguments.

    Args:
        family: ``spot`` or ``cell``.
        mode: Forward mode, short or reference name; overrides ``spot_context`` / ``cell_context``.
        **kwargs: The reference's constructor arguments.
    """
    cls = model_class(family)
    if mode is not None:
        kwargs[f"{family}_context"] = get_mode(family, mode).reference
    return cls(**kwargs)
