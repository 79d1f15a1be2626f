"""Layers and reductions shared by DeepSpot and DeepCell."""

from __future__ import annotations

import torch
from torch import nn

POOLS = ("sum", "mean", "max", "none")


class Phi(nn.Module):
    """``Linear(in, out) -> Dropout(p) -> ReLU``: one member of the Phi ensemble."""

    def __init__(self, input_size: int, output_size: int, p: float = 0.0):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(input_size, output_size), nn.Dropout(p=p), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Rho(nn.Module):
    """``Dropout(p) -> ReLU -> Linear(in, out) -> Dropout(0.1)``: one member of the Rho ensemble.

    The ReLU acts on Phi outputs, which are already non-negative, so in eval mode this is a plain linear layer.
    """

    def __init__(self, input_size: int, output_size: int, p: float = 0.0):
        super().__init__()
        self.model = nn.Sequential(
            nn.Dropout(p=p), nn.ReLU(inplace=True), nn.Linear(input_size, output_size), nn.Dropout(p=0.1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The median along ``dim`` with torch's semantics: the lower of the two middle values, NaN if any is NaN."""
    return torch.median(x, dim=dim).values


def pool(x: torch.Tensor, op: str) -> torch.Tensor:
    """Pool a bag of embeddings ``(B, T, H)`` over ``T``; ``none`` concatenates to ``(B, T*H)``."""
    if op == "sum":
        return x.sum(dim=1)
    if op == "mean":
        return x.mean(dim=1)
    if op == "max":
        return x.max(dim=1).values
    if op == "none":
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2])  # not -1: a batch of 0 items has no size to infer
    raise ValueError(f"unknown pooling {op!r}; expected one of: {', '.join(POOLS)}")


def phi_bag(x: torch.Tensor, phis: nn.ModuleList, op: str) -> torch.Tensor:
    """Run a bag through every Phi of the ensemble, take the lower median over the ensemble, pool over the bag.

    Args:
        x: Bag of tile features, ``(B, T, D)``.
        phis: The Phi ensemble; each member runs in turn, as in the reference (dropout draws in that order).
        op: Pooling over the bag axis.

    Returns:
        ``(B, H)``, or ``(B, T*H)`` for ``none``.
    """
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    h = torch.stack([phi(flat) for phi in phis], dim=1)  # (B*T, E, H)
    h = lower_median(h, dim=1)  # (B*T, H)
    h = h.reshape(b, t, h.shape[-1])  # (B, T, H); not -1, which a batch of 0 items leaves undefined
    return pool(h, op)


def rho_mean(h: torch.Tensor, rhos: nn.ModuleList) -> torch.Tensor:
    """Run every Rho of the ensemble in turn on ``h`` ``(B, m*H)`` and average: ``(B, G)``."""
    return torch.stack([rho(h) for rho in rhos], dim=1).mean(dim=1)
