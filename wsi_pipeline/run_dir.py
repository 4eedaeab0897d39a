"""Read a training run dir (DESIGN.md "Run outputs") for reporting: config, summary, per-fold predictions.

Everything the report needs is checked here, once, with errors that name the file, what is missing
and what to do; optional pieces (summary.csv, metrics.json, config.yaml) turn into warnings, and so do folds
left out of the report (stale, killed before writing their test predictions, or split but never trained).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from wsi_pipeline.stats import events_of

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = {
    "classification": ("case_id", "slide_id", "label", "pred"),
    "survival": ("case_id", "slide_id", "survival_months", "censorship", "risk"),
}
PROB_PREFIX = "prob_"
FOLD_DIR = re.compile(r"^fold_(\d+)$")
SPLITS_FILE = re.compile(r"^splits_(\d+)\.csv$")  # <task.splits_dir>/splits_<k>.csv: one per fold to train
CONFIG = "config.yaml"  # the run's settings in the run dir, and each fold's own in fold_<k>/
FOLD_KEYS = ("fold", "overwrite")  # settings of one invocation, not recorded in a config.yaml
# Recorded, but free to differ between the folds of a run dir and between a killed fold and its resume: where and
# how fast a fold runs, not what it learns.
UNCOMPARED_KEYS = ("device", "train.workers", "train.cache")
TRAINED_FILES = ("metrics.json", "model.pt", "resume.pt")  # a fold dir holding one was trained with its config.yaml


class ReportError(RuntimeError):
    """A run dir cannot be reported on; the message names the file and what to do."""


@dataclass
class Fold:
    index: int
    path: Path
    test: pd.DataFrame
    metrics: dict[str, float] = field(default_factory=dict)  # metrics.json, flattened to numbers

    @property
    def attention_path(self) -> Path:
        return self.path / "attention_test.h5"


@dataclass
class Run:
    path: Path
    task_type: str  # classification | survival
    task_name: str
    model_name: str
    class_names: list[str]
    features: Path | None
    folds: list[Fold]
    summary: pd.DataFrame | None  # one row per fold (index = fold), numeric test metrics
    warnings: list[str] = field(default_factory=list)
    left_out: list[int] = field(default_factory=list)  # folds of the run not reported (see `warnings`)

    @property
    def title(self) -> str:
        return f"{self.task_name} · {self.model_name}"


def prob_columns(frame: pd.DataFrame) -> list[str]:
    """`prob_0 … prob_{C-1}` in class order."""
    cols = [c for c in frame.columns if re.fullmatch(rf"{PROB_PREFIX}\d+", str(c))]
    return sorted(cols, key=lambda c: int(c[len(PROB_PREFIX):]))


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """`pd.read_csv`, with a ReportError naming the file when it cannot be read as CSV (empty, garbled, unreadable)."""
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ReportError(f"{path}: cannot read it as CSV ({err})") from err


def read_yaml(path: Path) -> DictConfig:
    """A YAML file of settings, with a ReportError naming the file when it is not valid YAML or not a mapping."""
    try:
        config = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ReportError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    if not isinstance(config, DictConfig):
        raise ReportError(f"{path}: holds a {type(config).__name__}, not a mapping of settings")
    return config


def optional_yaml(path: Path, warnings: list[str], otherwise: str) -> DictConfig | None:
    """`read_yaml(path)`, or None: silently when there is no such file, with a warning (ending in `otherwise`: what
    the report does instead) when it cannot be read."""
    if not path.is_file():
        return None
    try:
        return read_yaml(path)
    except ReportError as err:
        warnings.append(f"{err}; {otherwise}")
        return None


def read_predictions(path: str | Path, task_type: str) -> pd.DataFrame:
    """A predictions CSV, checked for the DESIGN.md columns of its task type."""
    path = Path(path)
    frame = read_csv(path, dtype={"case_id": str, "slide_id": str})
    missing = [c for c in REQUIRED_COLUMNS[task_type] if c not in frame.columns]
    if task_type == "classification" and len(prob_columns(frame)) < 2:
        missing.append("prob_0 … prob_{C-1}")
    if missing:
        raise ReportError(f"{path}: missing column(s) {missing} for a {task_type} run "
                          f"(found {list(frame.columns)}); was it written by wsi_pipeline.train?")
    if frame.empty:
        raise ReportError(f"{path}: no rows; the fold's test split was empty")
    _check_values(frame, path, task_type)
    return frame


def _check_values(frame: pd.DataFrame, path: Path, task_type: str) -> None:
    """Numbers where numbers belong: no NaN or infinite risk or probability, censorship 0/1, labels within the
    classes."""
    numeric = [c for c in REQUIRED_COLUMNS[task_type] if c not in ("case_id", "slide_id")] + prob_columns(frame)
    bad = [c for c in numeric if not _finite(frame[c])]
    if bad:
        raise ReportError(f"{path}: column(s) {bad} hold empty, infinite or non-numeric values; a NaN or infinite "
                          "risk or probability usually means the fold's training diverged: re-run that fold")
    if task_type == "survival" and not frame["censorship"].isin([0, 1]).all():
        raise ReportError(f"{path}: censorship must be 1 (censored) or 0 (event observed), found "
                          f"{sorted(frame['censorship'].unique().tolist())}")
    n_classes = len(prob_columns(frame))
    if task_type == "classification" and not frame[["label", "pred"]].isin(range(n_classes)).all().all():
        raise ReportError(f"{path}: label and pred must be class indices 0 … {n_classes - 1} "
                          f"(one per prob_<c> column)")


def _finite(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and bool(np.isfinite(column.to_numpy(float)).all())


def _select(config: DictConfig | None, key: str, default=None):
    if config is None:
        return default
    value = OmegaConf.select(config, key, default=default, throw_on_resolution_failure=False)
    return default if value is None else value


def load_config(run_dir: Path, warnings: list[str]) -> tuple[DictConfig | None, DictConfig | None]:
    """(the run's `config.yaml`, the config to read names from: that one, else Hydra's `.hydra/config.yaml`); None
    where there is none or it cannot be read (a warning)."""
    recorded = optional_yaml(run_dir / CONFIG, warnings, "left out, as if the run had none")
    if recorded is not None or (run_dir / CONFIG).is_file():
        return recorded, recorded
    return None, optional_yaml(run_dir / ".hydra" / CONFIG, warnings, "left out, as if the run had none")


def class_names(config: DictConfig | None, n_classes: int) -> list[str]:
    """Names from the task's label map ({name: index} or {index: name}) or class list, else `class <c>`."""
    names = [f"class {c}" for c in range(n_classes)]
    label_map = _select(config, "task.label_map") or _select(config, "task.labels")
    if isinstance(label_map, DictConfig):
        for key, value in label_map.items():
            pair = (value, key) if str(value).lstrip("-").isdigit() else (key, value)
            if str(pair[0]).isdigit() and int(pair[0]) < n_classes:
                names[int(pair[0])] = str(pair[1])
    listed = _select(config, "task.class_names") or _select(config, "task.classes")
    if isinstance(listed, ListConfig) and len(listed) == n_classes:
        names = [str(n) for n in listed]
    return names


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested dicts → one level of dotted keys: {"train": {"lr": 1e-4}} → {"train.lr": 1e-4}."""
    flat: dict = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def flatten_metrics(data: dict) -> dict[str, float]:
    """Nested metrics.json → {"test.auc": 0.9, ...}, numbers only."""
    return {k: float(v) for k, v in flatten(data).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def config_changes(recorded: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between two configs, but for UNCOMPARED_KEYS."""
    a, b = flatten(recorded), flatten(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in UNCOMPARED_KEYS)


def fold_config(fold_dir: Path) -> dict | None:
    path = fold_dir / CONFIG
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def trained_folds(run_dir: Path) -> list[Path]:
    """The fold dirs that hold a trained model, finished or not."""
    found = [p for p in run_dir.glob("fold_*") if FOLD_DIR.match(p.name) and p.is_dir()]
    return sorted(p for p in found if any((p / name).is_file() for name in TRAINED_FILES))


def stale_folds(run_dir: Path) -> dict[Path, list[str]]:
    """Trained folds whose config.yaml differs from the run's (a fold retrained with overwrite=true and other
    settings made the others stale), with the keys that differ. A fold without its own config.yaml (trained before
    folds recorded theirs) counts as the run's. (The trainer's check: a config.yaml that is not YAML raises; the
    report's `_stale_folds` warns instead.)"""
    if not (run_dir / CONFIG).is_file():
        return {}
    return differing_folds(run_dir, OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG)), fold_config)


def differing_folds(run_dir: Path, run: dict, recorded_of: Callable[[Path], dict | None]) -> dict[Path, list[str]]:
    """The trained folds whose settings (`recorded_of(fold_dir)`; None: not known, not compared) differ from `run`,
    with the keys that differ."""
    changes = {p: config_changes(recorded, run) for p in trained_folds(run_dir) if (recorded := recorded_of(p))}
    return {p: keys for p, keys in changes.items() if keys}


def _stale_folds(run_dir: Path, run_config: DictConfig | None, warnings: list[str]) -> dict[Path, list[str]]:
    """`stale_folds` against the run's config already read (`run_config`, None: none to compare with); a fold's
    config.yaml that cannot be read is a warning, and the fold counts as trained with the run's settings."""
    def recorded_of(fold: Path) -> dict | None:
        config = optional_yaml(fold / CONFIG, warnings, "the fold is taken as trained with the run's settings")
        return None if config is None else OmegaConf.to_container(config)

    return {} if run_config is None else differing_folds(run_dir, OmegaConf.to_container(run_config), recorded_of)


def read_summary(path: Path) -> pd.DataFrame:
    """summary.csv → its per-fold rows (index = fold number), numeric columns; mean/std rows dropped."""
    frame = read_csv(path)
    fold_col = next((c for c in frame.columns if str(c).lower() == "fold"), frame.columns[0])
    fold = pd.to_numeric(frame[fold_col], errors="coerce")
    rows = frame[fold.notna()].drop(columns=[fold_col])
    rows.index = fold[fold.notna()].astype(int).rename("fold")
    return rows.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")


def untrained_splits(config: DictConfig | None, fold_dirs: set[int]) -> dict[int, Path]:
    """The `<task.splits_dir>/splits_<k>.csv` files (read from the current folder, as the trainer does) of folds
    without a fold dir; {} when the config names no splits folder or it cannot be listed."""
    splits_dir = _select(config, "task.splits_dir")
    try:
        files = list(Path(splits_dir).iterdir()) if isinstance(splits_dir, str) else []
    except OSError:  # not there (a relative path read from elsewhere), not a folder, not readable
        return {}
    splits = {int(m.group(1)): p for p in files if (m := SPLITS_FILE.match(p.name))}
    return {k: p for k, p in sorted(splits.items()) if k not in fold_dirs}


def _fold_dirs(run_dir: Path, run_config: DictConfig | None, config: DictConfig | None,
               warnings: list[str]) -> tuple[list[tuple[int, Path]], list[int]]:
    """(index, dir) of the folds to report on, and the indices of the folds left out (each with a warning)."""
    dirs = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := FOLD_DIR.match(p.name)) and p.is_dir())
    finished = [(k, p) for k, p in dirs if (p / "predictions_test.csv").is_file()]
    unfinished = [(k, p) for k, p in dirs if (k, p) not in finished]
    for k, path in unfinished:
        warnings.append(f"{path}: no predictions_test.csv (fold {k} was killed, failed or is still training); left "
                        f"out: finish it (python -m wsi_pipeline.train ... fold={k}) and report again")
    untrained = untrained_splits(config, {k for k, _ in dirs})
    for k, path in untrained.items():
        warnings.append(f"{path}: fold {k} has a split but no {run_dir / f'fold_{k}'} (never trained); left out: "
                        f"train it (python -m wsi_pipeline.train ... fold={k}) and report again")
    stale = {p: keys for p, keys in _stale_folds(run_dir, run_config, warnings).items()
             if (p / "predictions_test.csv").is_file()}  # an unfinished fold is noted once, above
    for path, keys in sorted(stale.items()):
        warnings.append(f"{path}: trained with other values of {keys} than the run's config.yaml; left out "
                        "(retrain it with the run's settings: overwrite=true)")
    found = [(k, p) for k, p in finished if p not in stale]
    left_out = sorted(set(untrained) | {k for k, p in dirs if (k, p) not in found})
    if not found:
        raise ReportError(f"{run_dir}: no fold_<k>/predictions_test.csv" + (" trained with the run's settings"
                          if stale else "") + "; point run= at a finished training run dir "
                          "(python -m wsi_pipeline.train ... writes one per task × model)")
    return found, left_out


def _task_type(config: DictConfig | None, first_predictions: Path, warnings: list[str]) -> str:
    task_type = _select(config, "task.type")
    if task_type in REQUIRED_COLUMNS:
        return str(task_type)
    columns = read_csv(first_predictions, nrows=0).columns
    guessed = "survival" if "risk" in columns else "classification"
    warnings.append(f"{first_predictions.parent.parent}: no task.type in config.yaml; "
                    f"treating it as {guessed} from the predictions' columns")
    return guessed


def _load_fold(index: int, path: Path, task_type: str, warnings: list[str]) -> Fold:
    test = read_predictions(path / "predictions_test.csv", task_type)
    metrics: dict[str, float] = {}
    metrics_path = path / "metrics.json"
    if metrics_path.is_file():
        try:
            data = json.loads(metrics_path.read_text())
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not text
            warnings.append(f"{metrics_path}: not valid JSON ({err}); left out")
        else:
            if isinstance(data, dict):
                metrics = flatten_metrics(data)
            else:
                warnings.append(f"{metrics_path}: holds a {type(data).__name__}, not the trainer's metrics object; "
                                "left out")
    else:
        warnings.append(f"{metrics_path}: missing; the fold's metrics.json table leaves it out")
    return Fold(index, path, test, metrics)


def load_run(run_dir: str | Path, features: str | Path | None = None) -> Run:
    """Everything the report reads from one run dir; `features` overrides the config's features folder."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder; run= must name a training run dir")
    warnings: list[str] = []
    run_config, config = load_config(path, warnings)
    fold_dirs, left_out = _fold_dirs(path, run_config, config, warnings)
    if config is None:
        warnings.append(f"{path}: no usable config.yaml; task and model names come from the folder name")
    task_type = _task_type(config, fold_dirs[0][1] / "predictions_test.csv", warnings)
    folds = [_load_fold(k, p, task_type, warnings) for k, p in fold_dirs]
    n_classes = len(prob_columns(folds[0].test)) if task_type == "classification" else 0
    summary = None
    if (path / "summary.csv").is_file():
        try:
            summary = read_summary(path / "summary.csv")
        except ReportError as err:
            warnings.append(f"{err}; the metrics table comes from metrics.json only")
    else:
        warnings.append(f"{path / 'summary.csv'}: missing; the metrics table comes from metrics.json only")
    feature_dir = features if features is not None else _select(config, "features")
    for message in warnings:
        log.warning(message)
    return Run(path=path, task_type=task_type, task_name=str(_select(config, "task.name", path.parent.name)),
               model_name=str(_select(config, "model.name", path.name)), class_names=class_names(config, n_classes),
               features=Path(feature_dir) if feature_dir else None, folds=folds, summary=summary,
               warnings=warnings, left_out=left_out)


def event_arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time, event, risk) from a survival predictions frame (event = censorship == 0)."""
    return frame["survival_months"].to_numpy(float), events_of(frame["censorship"]), frame["risk"].to_numpy(float)
