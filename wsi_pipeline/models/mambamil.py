"""MambaMIL baseline: the same Mamba block with a causal 1D conv and `ops.selective_scan_1d` over the
tissue patches in raster order (row by row); `directions=4` is the cross-scan variant (rows and columns,
each forwards and backwards, one block per direction, their updates summed)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from . import register_model
from .blocks import GatedAttentionPool, MambaBlock, MILOutput, Packed, embed, raster_orders


class MambaMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, d_model: int = 128, n_layers: int = 1, d_state: int = 16,
                 expand: int = 2, d_conv: int = 4, dt_rank: int | str = "auto", dropout: float = 0.25,
                 directions: int = 1, attn_hidden: int = 128):
        super().__init__()
        if directions not in (1, 4):
            raise ValueError(f"directions must be 1 (raster) or 4 (cross-scan), not {directions}")
        self.directions = directions
        self.embed = embed(in_dim, d_model, dropout)
        self.layers = nn.ModuleList(
            nn.ModuleList(MambaBlock(d_model, "1d", d_state, expand, d_conv, dt_rank) for _ in range(directions))
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.pool = GatedAttentionPool(d_model, attn_hidden)
        self.head = nn.Linear(d_model, n_classes)
        self.grid_prep = functools.partial(packed_raster_orders, directions=directions)

    def forward(self, features: torch.Tensor, grid: torch.Tensor, prepared: Packed | None = None) -> MILOutput:
        x = self.embed(features).float()  # float32 residual stream under bf16 autocast, as in mamba2d
        orders = (self.grid_prep(grid) if prepared is None else prepared).to(features.device)
        for blocks in self.layers:
            update = torch.zeros_like(x)
            for block, order in zip(blocks, orders):
                seq = x[order]  # one sequence (L, d): the block takes it without batch views
                update = update.index_add(0, order, block(seq) - seq)
            x = x + update
        pooled, weights = self.pool(self.norm(x))
        return MILOutput(self.head(pooled), weights)


def packed_raster_orders(grid: torch.Tensor, directions: int) -> Packed:
    """MambaMIL's `grid_prep`: the scan orders of `raster_orders`, packed for one copy to the device."""
    return Packed(raster_orders(grid.cpu(), directions))


@register_model
def mambamil(**cfg) -> nn.Module:
    return MambaMIL(**cfg)


@register_model
def mambamil_cross4(**cfg) -> nn.Module:
    return MambaMIL(**{"directions": 4, **cfg})
