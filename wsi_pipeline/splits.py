"""Patient-level stratified k-fold splits in CLAM's format (Hydra app).

    python -m wsi_pipeline.splits labels=labels/panda.csv k=5 out=splits/panda

Cases (not slides) are split, so all slides of a patient land in the same column. Fold k tests on the k-th
of k stratified case folds and holds `val_fraction` of the remaining cases out for validation. Strata: the
label for classification, the censorship for survival.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from sklearn.model_selection import StratifiedKFold, train_test_split

from .config import CONFIG_DIR
from .data import SPLIT_COLUMNS, DataError
from .h5io import atomic_path

log = logging.getLogger(__name__)


def case_strata(labels: pd.DataFrame) -> pd.Series:
    """One stratum per case (its first slide's label, or censorship for survival CSVs)."""
    column = "label" if "label" in labels.columns else "censorship"
    if column not in labels.columns or "case_id" not in labels.columns:
        raise DataError("the labels CSV needs case_id and either label or censorship")
    return labels.groupby("case_id", sort=True)[column].first().astype(str)


def make_splits(labels: pd.DataFrame, k: int, val_fraction: float = 0.1, seed: int = 0) -> list[pd.DataFrame]:
    """k tables with columns train, val, test of case ids; no case in two columns of a table."""
    if k < 2:
        raise DataError(f"k={k}: k-fold splits need k >= 2 (each fold tests on 1/k of the cases)")
    strata = case_strata(labels)
    if len(strata) < k:
        raise DataError(f"{len(strata)} cases cannot make {k} folds")
    cases = strata.index.to_numpy()
    smallest = int(strata.value_counts().min())
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed) if smallest >= k else None
    if folds is None:
        log.warning("a stratum has only %d case(s) (< k=%d): folds are not stratified", smallest, k)
    parts = folds.split(cases, strata) if folds else _plain_folds(len(cases), k, seed)
    tables = []
    for rest, test in parts:
        train, val = _hold_out(cases[rest], strata.iloc[rest].to_numpy(), val_fraction, seed)
        columns = {"train": train, "val": val, "test": np.sort(cases[test])}
        tables.append(pd.concat({c: pd.Series(columns[c], dtype=str) for c in SPLIT_COLUMNS}, axis=1))
    return tables


def _plain_folds(n: int, k: int, seed: int):
    order = np.random.default_rng(seed).permutation(n)
    for chunk in np.array_split(order, k):
        yield np.setdiff1d(order, chunk), chunk


def _hold_out(cases: np.ndarray, strata: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_val = max(1, round(fraction * len(cases)))
    stratify = strata if min(np.unique(strata, return_counts=True)[1]) >= 2 and n_val >= len(set(strata)) else None
    train, val = train_test_split(cases, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(val)


def write_splits(tables: list[pd.DataFrame], out: str | Path) -> list[Path]:
    paths = []
    for k, table in enumerate(tables):
        path = Path(out) / f"splits_{k}.csv"
        with atomic_path(path) as tmp:
            table.to_csv(tmp)  # CLAM writes the row index as the first, unnamed column
        paths.append(path)
    return paths


@hydra.main(config_path=str(CONFIG_DIR), config_name="splits", version_base="1.3")
def main(cfg: DictConfig) -> None:
    path = Path(cfg.labels)
    if not path.is_file():
        sys.exit(f"error: {path}: labels CSV not found")
    try:
        tables = make_splits(pd.read_csv(path, dtype={"case_id": str}), int(cfg.k), float(cfg.val_fraction),
                             int(cfg.seed))
    except DataError as err:
        sys.exit(f"error: {path}: {err}")
    for p in write_splits(tables, cfg.out):
        log.info("wrote %s", p)


if __name__ == "__main__":
    main()
