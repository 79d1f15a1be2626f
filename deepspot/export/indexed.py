"""The indexed (whole-slide) layout: an encoder that runs Phi once per tile, and a head that gathers neighbours.

In the per-item layout every spot or cell carries copies of its neighbours' tiles, so the Phi ensemble runs again on
the same tile for every bag the tile appears in (45 times per cell for Xenium). On a slide each neighbour is another
item of the same slide, so its Phi embedding can be computed once and gathered by index:

1. the **encoder** maps each item's own tile ``(B, 1, D)`` to its Phi embedding ``(B, H)`` (the ensemble's lower
   median after ReLU), once per item, into a table of ``N x H``;
2. the **head** takes an item's own embedding ``(B, H)``, its sub-spot bag ``(B, S, D)`` where the mode has one
   (sub-spots belong to one spot only, so they are pooled there), and its neighbours' embeddings gathered from the
   table ``(B, K, H)``; it pools the neighbours as the model says and applies Rho.

Padding (index ``-1``, a zero row in the reference's loaders) gathers the embedding of an all-zero tile, which the
runtime computes with the encoder itself, so it is exactly what the per-item layout computes for a zero row.
Both modules reuse the per-item export module's building blocks, optimised or not, so both layouts share one
computation.
"""

from __future__ import annotations

from torch import nn
import torch

from ..errors import ConfigError
from ..modes import Mode
from .graph import ExportModule, pool_bag

ENCODER_INPUT = "tile"
ENCODER_OUTPUT = "embedding"
HEAD_EMBEDDING = "embedding"
HEAD_NEIGHBORS = "neighbor_embeddings"
OUTPUT = "expression"


def check_indexed_mode(mode: Mode) -> None:
    """Only modes with neighbours have anything to gather."""
    if not mode.has_neighbors:
        raise ConfigError(
            f"mode {mode.name!r} ({mode.reference}) has no neighbours, so it has no indexed layout; use --layout dense"
        )


def head_input_names(mode: Mode) -> tuple[str, ...]:
    """Inputs of the head graph, in call order: own embedding, sub-spots where the mode has them, neighbours."""
    names = [HEAD_EMBEDDING]
    if "subspot" in mode.input_names:
        names.append("subspot")
    names.append(HEAD_NEIGHBORS)
    return tuple(names)


class IndexedEncoder(nn.Module):
    """``tile (B, 1, D) -> embedding (B, H)``: the Phi ensemble's lower median of each item's own tile.

    The embedding is returned in ``table_dtype`` (``float32`` or ``float16``): the dtype the slide's table is kept in.
    """

    def __init__(self, dense: ExportModule, table_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.phi = dense.phi
        self.compute = dense.compute
        self.table_dtype = table_dtype

    def forward(self, tile: torch.Tensor) -> torch.Tensor:
        h = self.phi(tile.to(self.compute))  # (B, 1, H)
        return h.flatten(1).to(self.table_dtype)  # (B, H)


class IndexedHead(nn.Module):
    """``embedding (B, H)``, [``subspot (B, S, D)``], ``neighbor_embeddings (B, K, H)`` -> ``expression (B, G)``."""

    def __init__(self, dense: ExportModule):
        super().__init__()
        check_indexed_mode(dense.mode)
        self.mode = dense.mode
        self.phi = dense.phi
        self.rho = dense.rho
        self.scale_out = dense.scale_out
        self.compute = dense.compute
        self.io = dense.io
        self.neighbor_pool = dense.pools["neighbors"]
        self.has_subspot = "subspot" in dense.mode.input_names
        self.input_names = head_input_names(dense.mode)

    def forward(self, embedding: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if self.has_subspot:
            subspot, neighbors = rest
            sub = pool_bag(self.phi(subspot.to(self.compute)), "sum")  # (B, H)
            parts = [embedding.to(self.compute), sub]
        else:
            (neighbors,) = rest
            parts = [embedding.to(self.compute)]
        parts.append(pool_bag(neighbors.to(self.compute), self.neighbor_pool))  # (B, K, H) -> (B, H)
        y = self.rho(torch.cat(parts, dim=1)).to(self.io)  # (B, m*H) -> (B, G)
        return y if self.scale_out is None else self.scale_out(y)


def build_indexed_modules(dense: ExportModule, table_dtype: str = "fp32") -> tuple[IndexedEncoder, IndexedHead]:
    """The encoder and head of the indexed layout, sharing the weights of a per-item export module.

    Args:
        dense: The per-item module (:func:`deepspot.export.build_export_module`), optimised or not, any precision.
        table_dtype: ``fp32`` or ``fp16``: the dtype of the embedding table kept for the whole slide.
    """
    check_indexed_mode(dense.mode)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    if table_dtype not in dtypes:
        raise ConfigError(f"unknown table dtype {table_dtype!r}; expected fp32 or fp16")
    return IndexedEncoder(dense, dtypes[table_dtype]).eval(), IndexedHead(dense).eval()
