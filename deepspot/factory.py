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
        **kwargs: The reference's constructor arguments (``input_size``, ``output_size``, ``phi2rho_size``,
            ``n_ensemble``, ``random_seed``, ...; see :class:`~deepspot.spot.DeepSpot` and
            :class:`~deepspot.cell.DeepCell`).

    Returns:
        The model, in training mode (``.eval()`` it to predict). Building it seeds Python, NumPy and torch with
        ``random_seed`` and makes cuDNN deterministic, as the reference does: that fixes its initial weights.

    Raises:
        ConfigError: An unknown family, mode, loss or pooling, or an invalid size.
        TypeError: An argument the constructor does not take.
    """
    cls = model_class(family)
    if mode is not None:
        kwargs[f"{family}_context"] = get_mode(family, mode).reference
    return cls(**kwargs)
