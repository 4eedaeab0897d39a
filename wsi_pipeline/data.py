"""Labels, splits and feature-grid datasets for training (CLAM/MCAT file conventions, see DESIGN.md).

Labels CSV: classification `case_id, slide_id, label`; survival `case_id, slide_id, survival_months,
censorship` (1 = censored). Splits: `<splits_dir>/splits_<k>.csv` with columns `train, val, test` of case
ids. Every check here ends in a `DataError` naming the file, what is wrong and what to do.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .h5io import read_features
from .metrics import list_metrics

log = logging.getLogger(__name__)

TASK_TYPES = ("classification", "survival")
SPLIT_COLUMNS = ("train", "val", "test")
REQUIRED = {"classification": ["case_id", "slide_id", "label"],
            "survival": ["case_id", "slide_id", "survival_months", "censorship"]}


class DataError(ValueError):
    """Labels, splits or features that do not fit together; the message names the file and the fix."""


@dataclass
class Task:
    """One cohort and question (configs/task/<name>.yaml)."""

    name: str
    type: str
    labels_csv: str
    splits_dir: str
    metrics: list[str]
    monitor: str  # the validation metric that picks the best checkpoint (higher is better)
    label_map: dict = field(default_factory=dict)  # classification: CSV label -> class index
    n_bins: int = 4  # survival: hazard bins (quantiles of uncensored training times)
    alpha: float = 0.0  # survival: weight of the uncensored-only NLL term

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise DataError(f"task {self.name}: type must be one of {TASK_TYPES}, not {self.type!r}")
        if self.type == "classification" and not self.label_map:
            raise DataError(f"task {self.name}: a classification task needs a label_map (CSV label -> index)")
        self.metrics = list(self.metrics)
        unknown = [m for m in self.metrics if m not in list_metrics(self.type)]
        if unknown:
            raise DataError(f"task {self.name}: unknown metric(s) {unknown} for a {self.type} task; "
                            f"known: {list_metrics(self.type)}")
        if self.monitor not in self.metrics:
            raise DataError(f"task {self.name}: monitor {self.monitor!r} must be one of its metrics {self.metrics}")
        self.label_map = {str(k): int(v) for k, v in dict(self.label_map).items()}
        indices = sorted(set(self.label_map.values()))
        if indices != list(range(len(indices))):
            raise DataError(f"task {self.name}: label_map indices must be 0 ... C-1 (the classes' output rows), "
                            f"found {indices}")

    @classmethod
    def from_config(cls, values: dict) -> "Task":
        """A task YAML as a Task; unknown keys are named rather than failing with a TypeError."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"task {values.get('name')}: unknown key(s) {unknown}; a task YAML may hold {sorted(known)}")
        return cls(**values)

    @property
    def n_outputs(self) -> int:
        return self.n_bins if self.type == "survival" else len(set(self.label_map.values()))


def _listing(items, limit: int = 20) -> str:
    items = sorted(map(str, items))
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def read_labels(task: Task) -> pd.DataFrame:
    """The labels CSV, checked; classification labels are mapped to class indices in column `label`."""
    path = Path(task.labels_csv)
    if not path.is_file():
        raise DataError(f"{path}: labels CSV not found (task {task.name}: set task.labels_csv)")
    frame = pd.read_csv(path, dtype={"case_id": str, "slide_id": str})
    missing = [c for c in REQUIRED[task.type] if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a {task.type} labels CSV needs {REQUIRED[task.type]}")
    if frame["slide_id"].duplicated().any():
        raise DataError(f"{path}: slide ids listed twice: {_listing(frame.slide_id[frame.slide_id.duplicated()])}")
    if task.type == "classification":
        raw = frame["label"].astype(str)
        unknown = set(raw) - set(task.label_map)
        if unknown:
            raise DataError(f"{path}: unknown label(s) {_listing(unknown)}; task {task.name}'s label_map knows "
                            f"{sorted(task.label_map)} (fix the CSV or add them to configs/task/{task.name}.yaml)")
        frame["label"] = raw.map(task.label_map).astype(int)
    else:
        bad = ~frame["censorship"].isin([0, 1]) | ~np.isfinite(pd.to_numeric(frame["survival_months"], errors="coerce"))
        if bad.any():
            raise DataError(f"{path}: survival_months must be numbers and censorship 0 or 1; bad rows for slides "
                            f"{_listing(frame.slide_id[bad])}")
    return frame


def attach_features(labels: pd.DataFrame, features_dir: str | Path, missing: str = "error") -> pd.DataFrame:
    """Add each slide's `features/<slide_id>.h5` path; slides without one raise (`missing=error`) or are
    dropped with a warning (`missing=skip`)."""
    if missing not in ("error", "skip"):
        raise DataError(f"missing must be 'error' or 'skip', not {missing!r}")
    features_dir = Path(features_dir)
    paths = labels["slide_id"].map(lambda s: features_dir / f"{s}.h5")
    absent = ~paths.map(Path.is_file)
    if absent.any() and missing == "error":
        raise DataError(f"{features_dir}: no features for {absent.sum()} labelled slide(s): "
                        f"{_listing(labels.slide_id[absent])}. Extract them, fix the labels CSV, or pass missing=skip")
    if absent.any():
        log.warning("%s: skipping %d labelled slide(s) with no features: %s", features_dir, absent.sum(),
                    _listing(labels.slide_id[absent]))
    return labels.assign(path=paths.map(str))[~absent].reset_index(drop=True)


def read_split(task: Task, fold: int, labels: pd.DataFrame,
               available: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """The slides of each split column of `<splits_dir>/splits_<fold>.csv` (all slides of a case), from `available`
    (the labelled slides with features; default all of `labels`). Cases must be in `labels`; cases whose slides are
    all unavailable (`missing=skip`) are left out with a warning. Every split must keep a slide."""
    path = Path(task.splits_dir) / f"splits_{fold}.csv"
    if not path.is_file():
        raise DataError(f"{path}: split file not found; make one with "
                        f"`python -m wsi_pipeline.splits labels={task.labels_csv} out={task.splits_dir}`")
    table = pd.read_csv(path, dtype=str)
    if not set(SPLIT_COLUMNS) <= set(table.columns):
        raise DataError(f"{path}: needs columns {list(SPLIT_COLUMNS)}, found {list(table.columns)}")
    cases = {col: set(table[col].dropna()) for col in SPLIT_COLUMNS}
    unknown = set().union(*cases.values()) - set(labels["case_id"])
    if unknown:
        raise DataError(f"{path}: case id(s) not in the labels CSV {task.labels_csv}: {_listing(unknown)}")
    for i, a in enumerate(SPLIT_COLUMNS):
        for b in SPLIT_COLUMNS[i + 1:]:
            if cases[a] & cases[b]:
                raise DataError(f"{path}: case(s) in both {a} and {b}: {_listing(cases[a] & cases[b])}")
    available = labels if available is None else available
    splits = {}
    for col in SPLIT_COLUMNS:
        dropped = cases[col] - set(available["case_id"])
        if dropped:
            log.warning("%s: %d %s case(s) have no slide with features and are left out: %s", path, len(dropped), col,
                        _listing(dropped))
        splits[col] = available[available.case_id.isin(cases[col])].reset_index(drop=True)
        if splits[col].empty:
            raise DataError(f"{path}: the {col} split has no slides" + (" with features" if dropped else "") +
                            f"; every fold needs train, val and test cases (remake the splits with "
                            f"`python -m wsi_pipeline.splits labels={task.labels_csv} out={task.splits_dir}`)")
    return splits


def survival_bins(train: pd.DataFrame, n_bins: int) -> np.ndarray:
    """Bin edges from quantiles of the uncensored training times; outer edges open so every time has a bin."""
    times = train.loc[train.censorship == 0, "survival_months"].to_numpy(float)
    if len(times) < n_bins:
        raise DataError(f"only {len(times)} uncensored cases in the training split; need at least n_bins={n_bins}")
    edges = np.quantile(times, np.linspace(0, 1, n_bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    return edges


def bin_of(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)


@dataclass
class Bag:
    """One slide as the models see it; `target` holds label, or bin + censorship for survival."""

    slide_id: str
    case_id: str
    features: torch.Tensor  # (N, D) float16 or float32, as stored
    grid: torch.Tensor  # (N, 2) long
    target: dict[str, torch.Tensor]
    prepared: Any = None  # the model's `grid_prep` of grid, when the bags were given one

    def pin_memory(self) -> Bag:
        """The bag with its features, and its prepared grid when that has a `pin_memory`, in pinned host memory: the
        trainer's data loader calls this on CUDA (its pin_memory), so their copies to the GPU do not block."""
        prepared = self.prepared.pin_memory() if hasattr(self.prepared, "pin_memory") else self.prepared
        return replace(self, features=self.features.pin_memory(), prepared=prepared)


class FeatureBags(Dataset):
    """The slides of one split, read from their feature files on access (`cache=True` keeps them in memory).

    `prepare` (a model's `grid_prep`, see wsi_pipeline.models): run on each slide's grid as it is read, in the data
    loader's worker processes when there are any, so that the training step does not wait for the model's host work.
    """

    def __init__(self, frame: pd.DataFrame, task: Task, bins: np.ndarray | None = None, cache: bool = False,
                 prepare: Callable[[torch.Tensor], Any] | None = None):
        self.frame, self.task, self.bins, self.cache = frame.reset_index(drop=True), task, bins, cache
        self.prepare = prepare
        self._memory: dict[int, Bag] = {}

    def __len__(self) -> int:
        return len(self.frame)

    def _target(self, row) -> dict[str, torch.Tensor]:
        if self.task.type == "classification":
            return {"label": torch.tensor(int(row.label))}
        return {"bin": torch.tensor(int(bin_of(np.array([row.survival_months]), self.bins)[0])),
                "censorship": torch.tensor(float(row.censorship))}

    def __getitem__(self, i: int) -> Bag:
        bag = self._memory.get(i) or self._read(i)
        if bag.prepared is None and self.prepare is not None:  # (a bag cached before `prepare` was set, too)
            bag.prepared = self.prepare(bag.grid)
        return bag

    def _read(self, i: int) -> Bag:
        row = self.frame.iloc[i]
        grid = read_features(row.path)
        if len(grid.grid) == 0:  # here, where the file is known, rather than in a model's forward or grid_prep
            raise DataError(f"{row.path}: slide {row.slide_id} has no patches (an empty feature grid), which no model "
                            "can take; re-run its extraction, or drop it from the labels CSV")
        # Features keep their stored dtype (float16 halves the host-to-GPU copy); the trainer casts on the device.
        bag = Bag(str(row.slide_id), str(row.case_id), torch.from_numpy(np.ascontiguousarray(grid.features)),
                  torch.from_numpy(grid.grid.astype(np.int64)), self._target(row))
        if self.cache:
            self._memory[i] = bag
        return bag
