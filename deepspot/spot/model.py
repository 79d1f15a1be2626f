"""DeepSpot: spot-level gene expression from the features of a spot, its sub-spots and its neighbours."""

from __future__ import annotations

from typing import Any

from ..base import DeepSetModel
from ..layers import Phi, Rho  # noqa: F401  (re-exported under the reference's module path)
from .loss import LOSSES


class DeepSpot(DeepSetModel):
    """DeepSpot (Nonchev et al., 2025) as a plain ``torch.nn.Module``.

    Args:
        input_size: Features per tile (1024 for UNI, 1536 for H-optimus-0, ...).
        output_size: Number of genes.
        loss_func: One of ``mse``, ``cos``, ``mse_cos``, ``pearson``, ``mse_pearson``, ``poisson``.
        lr: AdamW learning rate used by :func:`deepspot.train.fit`.
        p: Dropout of Phi and Rho unless ``p_phi`` / ``p_rho`` are given.
        p_phi: Dropout of the Phi networks; ``None`` means ``p`` (an explicit 0 is kept, unlike the reference).
        p_rho: Dropout of the Rho networks; ``None`` means ``p``.
        n_ensemble: Ensemble size of Phi and Rho unless given separately.
        n_ensemble_phi: Number of Phi networks; ``None`` means ``n_ensemble``.
        n_ensemble_rho: Number of Rho networks; ``None`` means ``n_ensemble``.
        phi2rho_size: Width ``H`` of a Phi embedding.
        weight_decay: AdamW weight decay.
        random_seed: Seed set (with :func:`deepspot.utils.fix_seed`) before the layers are built.
        scaler: Optional target scaler (a :class:`deepspot.scaler.Scaler` or a fitted sklearn scaler).
        spot_context: ``spot``, ``subspot``, ``neighbors`` or ``subspot_neighbors`` (reference names accepted).
    """

    family = "spot"
    phi_attr = "phi_spot"
    losses = LOSSES

    def __init__(
        self,
        input_size: int,
        output_size: int,
        loss_func: str = "mse",
        lr: float = 1e-4,
        p: float = 0.3,
        p_phi: float | None = None,
        p_rho: float | None = None,
        n_ensemble: int = 10,
        n_ensemble_phi: int | None = None,
        n_ensemble_rho: int | None = None,
        phi2rho_size: int = 512,
        weight_decay: float = 1e-6,
        random_seed: int = 2024,
        scaler: Any = None,
        spot_context: str = "spot_subspot_neighbors",
    ):
        super().__init__()
        config = dict(
            input_size=int(input_size),
            output_size=int(output_size),
            loss_func=loss_func,
            lr=float(lr),
            p=float(p),
            p_phi=p_phi,
            p_rho=p_rho,
            n_ensemble=int(n_ensemble),
            n_ensemble_phi=n_ensemble_phi,
            n_ensemble_rho=n_ensemble_rho,
            phi2rho_size=int(phi2rho_size),
            weight_decay=float(weight_decay),
            random_seed=int(random_seed),
            spot_context=spot_context,
        )
        self._build(config, spot_context, scaler)
