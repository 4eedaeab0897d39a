"""ABMIL (Ilse et al. 2018): embed each patch, gated attention pooling, linear head. Permutation invariant."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register_model
from .blocks import GatedAttentionPool, MILOutput, embed


class ABMIL(nn.Module):
    grid_prep = None  # no host work on the grid (see wsi_pipeline.models)

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 128, attn_hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        self.embed = embed(in_dim, d_model, dropout)
        self.pool = GatedAttentionPool(d_model, attn_hidden)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, features: torch.Tensor, grid: torch.Tensor, prepared: None = None) -> MILOutput:
        pooled, weights = self.pool(self.embed(features))
        return MILOutput(self.head(pooled), weights)


@register_model
def abmil(**cfg) -> nn.Module:
    return ABMIL(**cfg)
