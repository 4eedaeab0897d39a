"""MIL models: a registry maps a config name to one constructor (`configs/model/<name>.yaml` ↔ one entry here).

Every model takes one slide, `forward(features (N, in_dim), grid (N, 2) lattice (row, col), prepared=None)`, and
returns a `MILOutput`: `logits` (n_classes,) and `attention` (N,), softmax-normalised over the slide's tissue cells.
For survival tasks `n_classes` is the number of hazard bins (see `blocks.survival_from_logits`).

A model whose geometry comes from the grid (2DMambaMIL's lattice, MambaMIL's scan orders) has a `grid_prep`: a
picklable function of the host grid that computes it on the host. The trainer's data loader runs it in its workers,
next to reading the slide, and passes its result as `prepared`, so the training step does not wait for it; without
`prepared` the model runs `grid_prep` itself. Models without such host work have `grid_prep = None`.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor under its function name (the name a config's `model.name` uses)."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **cfg) -> nn.Module:
    """Build a registered model from its config values (in_dim, n_classes and the model's own options)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {list_models()} (add one with @register_model)")
    return _REGISTRY[name](**cfg)


# Importing the modules fills the registry.
from . import abmil, mamba2d, mambamil, transmil  # noqa: E402,F401
from .blocks import MILOutput, survival_from_logits  # noqa: E402

__all__ = ["MILOutput", "create_model", "list_models", "register_model", "survival_from_logits"]
