"""DeepCell: cell-level gene expression from the features of a cell and its nearest cells."""

from __future__ import annotations

from typing import Any

from ..base import DeepSetModel
from ..errors import ConfigError
from ..layers import Phi, Rho  # noqa: F401  (re-exported under the reference's module path)
from .loss import LOSSES

AGGREGATIONS = ("max", "mean", "sum")


class DeepCell(DeepSetModel):
    """DeepCell as a plain ``torch.nn.Module``.

    Args:
        input_size: Features per tile.
        output_size: Number of genes.
        loss_func: One of ``mse``, ``cos``, ``l1``, ``huber``, ``mse_cos``, ``l1_cos``, ``huber_cos``, ``pearson``,
            ``mse_pearson``, ``poisson``.
        lr: AdamW learning rate used by :func:`deepspot.train.fit`.
        p: Dropout of Phi and Rho unless ``p_phi`` / ``p_rho`` are given.
        p_phi: Dropout of the Phi networks; ``None`` means ``p``.
        p_rho: Dropout of the Rho networks; ``None`` means ``p``.
        n_ensemble: Ensemble size of Phi and Rho unless given separately.
        n_ensemble_phi: Number of Phi networks; ``None`` means ``n_ensemble``.
        n_ensemble_rho: Number of Rho networks; ``None`` means ``n_ensemble``.
        phi2rho_size: Width ``H`` of a Phi embedding.
        emb_size: Unused; kept for compatibility with the reference's hyperparameters.
        weight_decay: AdamW weight decay.
        random_seed: Seed set before the layers are built.
        agg_neighbors: Pooling over the neighbour bag: ``max``, ``mean`` or ``sum``.
        scaler: Optional target scaler.
        cell_context: ``cell`` or ``neighbors`` (reference names accepted).
    """

    family = "cell"
    phi_attr = "phi_cell"
    losses = LOSSES

    def __init__(
        self,
        input_size: int,
        output_size: int,
        loss_func: str = "mse",
        lr: float = 1e-4,
        p: float = 0.2,
        p_phi: float | None = None,
        p_rho: float | None = None,
        n_ensemble: int = 10,
        n_ensemble_phi: int | None = None,
        n_ensemble_rho: int | None = None,
        phi2rho_size: int = 1024,
        emb_size: int = 1024,
        weight_decay: float = 1e-6,
        random_seed: int = 2024,
        agg_neighbors: str = "max",
        scaler: Any = None,
        cell_context: str = "cell_neighbors",
    ):
        super().__init__()
        if agg_neighbors not in AGGREGATIONS:
            raise ConfigError(f"unknown agg_neighbors {agg_neighbors!r}; expected one of: {', '.join(AGGREGATIONS)}")
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
            emb_size=int(emb_size),
            weight_decay=float(weight_decay),
            random_seed=int(random_seed),
            agg_neighbors=agg_neighbors,
            cell_context=cell_context,
        )
        self._build(config, cell_context, scaler)
