"""Slide-level metrics, computed with scikit-learn and scikit-survival; a registry so a task names its metrics.

Every metric takes the predictions table of DESIGN.md (`label, pred, prob_*` for classification;
`survival_months, censorship, risk` for survival) and returns one float; it is registered for the task type whose
table it reads, so a task naming a metric of the other type fails when its YAML is read, not after an epoch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import concordance_index_censored

Metric = Callable[[pd.DataFrame], float]
_METRICS: dict[str, Metric] = {}
_TASK_TYPE: dict[str, str] = {}  # metric name -> the task type whose predictions table it reads


def register_metric(task_type: str) -> Callable[[Metric], Metric]:
    def register(fn: Metric) -> Metric:
        _METRICS[fn.__name__], _TASK_TYPE[fn.__name__] = fn, task_type
        return fn

    return register


def probabilities(pred: pd.DataFrame) -> np.ndarray:
    cols = sorted((c for c in pred.columns if c.startswith("prob_")), key=lambda c: int(c.split("_")[1]))
    return pred[cols].to_numpy(dtype=float)


@register_metric("classification")
def accuracy(pred: pd.DataFrame) -> float:
    return float(accuracy_score(pred["label"], pred["pred"]))


@register_metric("classification")
def balanced_accuracy(pred: pd.DataFrame) -> float:
    return float(balanced_accuracy_score(pred["label"], pred["pred"]))


@register_metric("classification")
def macro_f1(pred: pd.DataFrame) -> float:
    return float(f1_score(pred["label"], pred["pred"], average="macro"))


@register_metric("classification")
def macro_auc(pred: pd.DataFrame) -> float:
    """Macro one-vs-rest ROC AUC over the classes present; NaN when only one class is present."""
    prob, labels = probabilities(pred), pred["label"].to_numpy()
    if len(np.unique(labels)) < 2:
        return float("nan")
    if prob.shape[1] == 2:
        return float(roc_auc_score(labels, prob[:, 1]))
    present = np.unique(labels)
    return float(np.mean([roc_auc_score(labels == k, prob[:, k]) for k in present]))


@register_metric("classification")
def qwk(pred: pd.DataFrame) -> float:
    """Quadratic weighted Cohen's kappa (PANDA's ISUP grades are ordinal)."""
    return float(cohen_kappa_score(pred["label"], pred["pred"], weights="quadratic"))


@register_metric("survival")
def c_index(pred: pd.DataFrame) -> float:
    """Harrell's concordance of `risk` with survival; censorship 1 = censored, so event = 1 - censorship.

    NaN when no pair is comparable (no event, or every event after every other time: small validation splits)."""
    event = pred["censorship"].to_numpy() == 0
    if len(event) < 2 or not event.any():
        return float("nan")
    try:
        return float(concordance_index_censored(event, pred["survival_months"].to_numpy(float),
                                                pred["risk"].to_numpy(float))[0])
    except NoComparablePairException:
        return float("nan")


def list_metrics(task_type: str | None = None) -> list[str]:
    """The registered metrics (of one task type when given)."""
    return sorted(n for n in _METRICS if task_type in (None, _TASK_TYPE[n]))


def compute_metrics(names: list[str], pred: pd.DataFrame) -> dict[str, float]:
    unknown = [n for n in names if n not in _METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; registered: {list_metrics()}")
    return {name: _METRICS[name](pred) for name in names}
