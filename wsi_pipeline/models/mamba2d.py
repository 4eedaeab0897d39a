"""2DMambaMIL (2DMamba, CVPR 2025): patch tokens on the slide's 2D lattice, 2D selective scan, attention pooling.

Features → Linear + GELU + dropout → tokens placed on the lattice (cropped to the tissue bounding box;
background cells hold a learnable or zero padding token) → U Mamba blocks whose mixer is a depthwise 3x3
conv on the lattice and `ops.selective_scan_2d` (row-first: each row, then each column; column-first runs
the same scan on the transposed lattice) → LayerNorm → gated attention over tissue cells → linear head.
Slides larger than `max_cells` lattice cells are coarsened by an integer stride (rows sharing a coarse
cell are averaged) so memory stays bounded; attention is then shared by the rows of a cell.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from . import register_model
from .blocks import (GatedAttentionPool, Lattice, MambaBlock, MILOutput, build_lattice, embed, place_on_lattice,
                     row_attention)

PAD_TOKENS = ("learnable", "zero")
SCAN_ORDERS = ("row_first", "column_first")


class Mamba2DMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, d_model: int = 128, n_layers: int = 1, d_state: int = 16,
                 expand: int = 2, d_conv: int = 3, dt_rank: int | str = "auto", dropout: float = 0.25,
                 pad_token: str = "learnable", scan_order: str = "row_first", mask_padding: bool = True,
                 attn_hidden: int = 128, max_cells: int = 160_000):
        super().__init__()
        if pad_token not in PAD_TOKENS or scan_order not in SCAN_ORDERS:
            raise ValueError(f"pad_token must be one of {PAD_TOKENS} and scan_order one of {SCAN_ORDERS}, "
                             f"not {pad_token!r} / {scan_order!r}")
        self.embed = embed(in_dim, d_model, dropout)
        self.pad = nn.Parameter(torch.zeros(d_model), requires_grad=pad_token == "learnable")
        if pad_token == "learnable":
            nn.init.normal_(self.pad, std=0.02)
        self.blocks = nn.ModuleList(
            MambaBlock(d_model, "2d", d_state, expand, d_conv, dt_rank) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.pool = GatedAttentionPool(d_model, attn_hidden)
        self.head = nn.Linear(d_model, n_classes)
        self.column_first, self.mask_padding, self.max_cells = scan_order == "column_first", mask_padding, max_cells
        self.grid_prep = functools.partial(build_lattice, max_cells=max_cells)

    def forward(self, features: torch.Tensor, grid: torch.Tensor, prepared: Lattice | None = None) -> MILOutput:
        lattice = (self.grid_prep(grid) if prepared is None else prepared).to(features.device)
        # The residual stream stays float32 under bf16 autocast (as Mamba's residual_in_fp32; the cells take the pad
        # token's dtype): exact cell means, and RMSNorm sees matching dtypes (its fused kernel).
        x = place_on_lattice(self.embed(features), lattice, self.pad)  # (cells, d): no batch views
        shape = (lattice.height, lattice.width)
        if self.column_first:  # scanning the transposed lattice row-first = the original one column-first
            x, shape = _transposed(x, shape), shape[::-1]
        for block in self.blocks:  # (cells widening added stay zero: see build_lattice)
            x = block(x, shape)
        if self.column_first:
            x = _transposed(x, shape)
        x = self.norm(x)
        # attention over the tissue (or, unmasked, the whole box), never over cells widening added
        bias = lattice.score_bias if self.mask_padding else lattice.inside.log() if lattice.widened else None
        pooled, weights = self.pool(x, bias)
        weights = weights.detach()
        return MILOutput(self.head(pooled), lambda: row_attention(weights, lattice))


def _transposed(cells: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(height * width, d) cells in row-major order of the (height, width) lattice -> those of its transpose."""
    return cells.view(*shape, -1).transpose(0, 1).reshape(shape[0] * shape[1], -1)


@register_model
def mamba2d(**cfg) -> nn.Module:
    return Mamba2DMIL(**cfg)
