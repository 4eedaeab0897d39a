"""TransMIL (Shao et al. 2021): class token + two transformer layers with a PPEG positional conv between them.

Differences from the paper, on purpose: exact attention through `scaled_dot_product_attention` (memory-
efficient/flash kernels on GPU) instead of the Nyström approximation; the returned attention is the class
token's attention over the patches in the last layer, averaged over heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model
from .blocks import MILOutput, embed


class TransLayer(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (1, L, d) → (x + attention(x), the first token's attention over all tokens (L,))."""
        q, k, v = (t.view(1, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in self.qkv(self.norm(x)).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        cls_weights = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
        return x + self.out(y), cls_weights.mean(dim=1).flatten()


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convs on the tokens laid out as a square."""

    def __init__(self, d_model: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(d_model, d_model, k, padding=k // 2, groups=d_model) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    grid_prep = None  # no host work on the grid (see wsi_pipeline.models)

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 256, heads: int = 8, dropout: float = 0.25):
        super().__init__()
        self.embed = embed(in_dim, d_model, dropout)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.layer1, self.layer2 = TransLayer(d_model, heads), TransLayer(d_model, heads)
        self.ppeg = PPEG(d_model)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, features: torch.Tensor, grid: torch.Tensor, prepared: None = None) -> MILOutput:
        h = self.embed(features)
        n = h.shape[0]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[: side * side - n]], dim=0)  # fill the square by repeating the first tokens
        x = torch.cat([self.cls, h.unsqueeze(0)], dim=1)
        x, _ = self.layer1(x)
        x, cls_weights = self.layer2(self.ppeg(x, side))
        attention = cls_weights[1: n + 1]
        return MILOutput(self.head(self.norm(x[0, 0])), attention / attention.sum())


@register_model
def transmil(**cfg) -> nn.Module:
    return TransMIL(**cfg)
