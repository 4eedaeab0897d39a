"""MIL models: a registry maps a config name to one constructor (`configs/model/<name>.yaml` ↔ one entry here).

Every model takes one slide, `forward(features (N, in_dim), grid (N, 2) lattice (row, col))`, and returns a
`MILOutput`: `logits` (n_classes,) and `attention` (N,), softmax-normalised over the slide's tissue cells.
For survival tasks `n_classes` is the number of hazard bins (see `blocks.survival_from_logits`).
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
