"""DeepSpot's losses, called as ``loss(prediction, target)``, with the reference's names and definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_mse_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def loss_cosine_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over genes of ``1 - cos``, the cosine taken per gene across the batch."""
    return (1 - F.cosine_similarity(pred, target, dim=0)).mean()


def loss_pearson_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over spots of ``1 - cos`` of the row-centred prediction and target (Pearson per spot)."""
    cos = F.cosine_similarity(pred - pred.mean(dim=1, keepdim=True), target - target.mean(dim=1, keepdim=True))
    return (1 - cos).mean()


def loss_poisson_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.poisson_nll_loss(torch.exp(pred), target)


def loss_mse_pearson_function(pred: torch.Tensor, target: torch.Tensor, mse_w: float = 0.2) -> torch.Tensor:
    # The reference's "mse_pearson" uses the cosine loss, not Pearson; kept as is.
    return loss_cosine_function(pred, target) + mse_w * loss_mse_function(pred, target)


def loss_mse_cosine_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return loss_cosine_function(pred, target) + loss_mse_function(pred, target)


LOSSES = {
    "mse": loss_mse_function,
    "cos": loss_cosine_function,
    "mse_cos": loss_mse_cosine_function,
    "pearson": loss_pearson_function,
    "mse_pearson": loss_mse_pearson_function,
    "poisson": loss_poisson_function,
}
