"""Generated feature grids: small cohorts for tests and the demo-free checks, big slides for benchmarks, and
the "arrangement" task where the class lives only in the 2D layout of two token types.

Everything is seeded and written with the real file formats (h5io.write_features, CLAM labels/splits CSVs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .h5io import FeatureGrid, atomic_path, write_features

PATCH_SIZE_LEVEL0 = 1024


def tissue_cells(height: int, width: int, n_cells: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) (row, col) of about `n_cells` cells forming an ellipse-shaped tissue blob, in raster order."""
    rows, cols = np.mgrid[:height, :width]
    noise = rng.normal(0, 0.05, (height, width))
    radius = ((rows - height / 2 + 0.5) / (height / 2)) ** 2 + ((cols - width / 2 + 0.5) / (width / 2)) ** 2 + noise
    keep = np.sort(np.argsort(radius, axis=None)[: min(n_cells, height * width)]).astype(np.int64)
    return np.stack([keep // width, keep % width], axis=1)


def feature_grid(features: np.ndarray, grid: np.ndarray, slide_id: str, grid_shape: tuple[int, int]) -> FeatureGrid:
    """A FeatureGrid with the DESIGN.md attrs, coords derived from the lattice."""
    grid = np.asarray(grid, np.int32)
    attrs = dict(slide_id=slide_id, patch_size=512, target_mpp=0.5, level0_mpp=0.25,
                 patch_size_level0=PATCH_SIZE_LEVEL0, grid_shape=tuple(grid_shape), encoder="generated",
                 embed_dim=int(features.shape[1]))
    return FeatureGrid(grid[:, ::-1].astype(np.int64) * PATCH_SIZE_LEVEL0, grid, attrs, features=features)


@dataclass
class Cohort:
    features: Path
    labels: Path
    splits: Path


def write_cohort(root: str | Path, n_cases: int = 24, dim: int = 16, survival: bool = False, k: int = 2,
                 side: int = 6, seed: int = 0) -> Cohort:
    """A small two-class (or survival) cohort with a learnable signal: class-1 slides have some patches whose
    features are shifted; survival times shorten with that shift. One slide per case; k CLAM split files."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = []
    for i in range(n_cases):
        label = i % 2
        grid = tissue_cells(side, side + 2, int(side * (side + 2) * 0.7), rng) + rng.integers(0, 20, 2)
        feats = rng.normal(0, 1, (len(grid), dim)).astype(np.float32)
        feats[: len(grid) // 3, :4] += 1.5 * label
        write_features(root / "features" / f"slide_{i:02d}.h5",
                       feature_grid(feats.astype(np.float16), grid, f"slide_{i:02d}", (40, 40)))
        months = float(np.round((60.0 if label == 0 else 15.0) * np.exp(rng.normal(0, 0.3)), 2))
        rows.append(dict(case_id=f"case_{i:02d}", slide_id=f"slide_{i:02d}", label=["benign", "tumour"][label],
                         survival_months=months, censorship=int(rng.random() < 0.2)))
    labels = pd.DataFrame(rows)
    if survival:
        labels = labels.drop(columns="label")
    with atomic_path(root / "labels.csv") as tmp:
        labels.to_csv(tmp, index=False)
    from .splits import make_splits, write_splits  # the real split maker: the tests exercise it too

    write_splits(make_splits(labels, k, val_fraction=0.25, seed=seed), root / "splits")
    return Cohort(root / "features", root / "labels.csv", root / "splits")


def arrangement_bag(label: int, rng: np.random.Generator, side: int = 8, n_marked: int = 8, dim: int = 8,
                    noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A slide whose class is only in the 2D arrangement of two token types, never in their counts.

    Every slide has `n_marked` tokens of type A and the rest of type B on a side x side lattice. Class 1: the
    A tokens form one solid 2 x n/2 (or n/2 x 2) rectangle; class 0: they are scattered with no two touching
    (not even diagonally). The multiset of features has the same distribution in both classes, so any
    permutation-invariant pooling is at chance; a 2D scan (or conv) that sees neighbours can tell them apart.
    """
    type_a, type_b = np.eye(dim, dtype=np.float32)[0] * 2, np.eye(dim, dtype=np.float32)[1] * 2
    marked = np.zeros((side, side), bool)
    if label == 1:
        h, w = (2, n_marked // 2) if rng.random() < 0.5 else (n_marked // 2, 2)
        r, c = rng.integers(0, side - h + 1), rng.integers(0, side - w + 1)
        marked[r:r + h, c:c + w] = True
    else:
        while marked.sum() < n_marked:
            r, c = rng.integers(0, side, 2)
            if not marked[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].any():
                marked[r, c] = True
    rows, cols = np.mgrid[:side, :side]
    grid = np.stack([rows.ravel(), cols.ravel()], 1) + rng.integers(0, 50, 2)
    feats = np.where(marked.ravel()[:, None], type_a, type_b) + rng.normal(0, noise, (side * side, dim))
    return feats.astype(np.float32), grid.astype(np.int64)


def write_arrangement_cohort(root: str | Path, n_cases: int = 160, seed: int = 0, **bag_options) -> Cohort:
    """The arrangement task as a cohort on disk: balanced classes, one split file (60% train, 15% val, 25% test)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = []
    for i in range(n_cases):
        feats, grid = arrangement_bag(i % 2, rng, **bag_options)
        slide_id = f"arr_{i:03d}"
        write_features(root / "features" / f"{slide_id}.h5", feature_grid(feats, grid, slide_id, (64, 64)))
        rows.append(dict(case_id=f"case_{i:03d}", slide_id=slide_id, label=["benign", "tumour"][i % 2]))
    labels = pd.DataFrame(rows)
    with atomic_path(root / "labels.csv") as tmp:
        labels.to_csv(tmp, index=False)
    cases = labels.case_id.to_numpy()
    n_train, n_val = int(0.6 * n_cases), int(0.15 * n_cases)
    split = pd.concat({"train": pd.Series(cases[:n_train]), "val": pd.Series(cases[n_train:n_train + n_val]),
                       "test": pd.Series(cases[n_train + n_val:])}, axis=1)
    with atomic_path(root / "splits" / "splits_0.csv") as tmp:
        split.to_csv(tmp)
    return Cohort(root / "features", root / "labels.csv", root / "splits")
