"""DeepCell's losses, called as ``loss(prediction, target)``, with the reference's names and definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spot.loss import loss_cosine_function, loss_mse_function, loss_poisson_function


def loss_pearson_function(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over genes of ``1 - r``, ``r`` the Pearson correlation of each gene across the batch."""
    pc = pred - pred.mean(dim=0)
    tc = target - target.mean(dim=0)
    cov = (pc * tc).sum(dim=0)
    r = cov / (torch.sqrt((pc**2).sum(dim=0) + eps) * torch.sqrt((tc**2).sum(dim=0) + eps))
    return (1 - r).mean()


def loss_l1_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target)


def loss_huber_function(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    return F.huber_loss(pred, target, delta=delta)


def loss_mse_pearson_function(pred: torch.Tensor, target: torch.Tensor, mse_w: float = 0.1) -> torch.Tensor:
    # As in the reference: the cosine loss weighted by 0.1, plus MSE.
    return mse_w * loss_cosine_function(pred, target) + loss_mse_function(pred, target)


def loss_mse_cosine_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return loss_cosine_function(pred, target) + loss_mse_function(pred, target)


def loss_l1_cosine_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return loss_cosine_function(pred, target) + loss_l1_function(pred, target)


def loss_huber_cosine_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return loss_cosine_function(pred, target) + loss_huber_function(pred, target)


LOSSES = {
    "mse": loss_mse_function,
    "cos": loss_cosine_function,
    "l1": loss_l1_function,
    "huber": loss_huber_function,
    "mse_cos": loss_mse_cosine_function,
    "l1_cos": loss_l1_cosine_function,
    "huber_cos": loss_huber_cosine_function,
    "pearson": loss_pearson_function,
    "mse_pearson": loss_mse_pearson_function,
    "poisson": loss_poisson_function,
}
