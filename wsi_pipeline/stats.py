"""The statistics of a report: C-index with a bootstrap CI, median-risk groups, log-rank test, ROC.

Arrays in, numbers out (lifelines / scikit-survival style), so every function is testable without
files. Survival inputs follow the labels CSV convention: `censorship` 1 = censored, 0 = event, and a
higher `risk` means an earlier expected event.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from lifelines.statistics import logrank_test
from sklearn.metrics import roc_auc_score, roc_curve
from sksurv.metrics import concordance_index_censored

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval; `n_resamples` counts the bootstrap draws that were usable."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    n_resamples: int = 0

    def __str__(self) -> str:
        if not np.isfinite(self.estimate):
            return "n/a"
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class LogRank:
    p_value: float
    statistic: float
    n_high: int
    n_low: int


def events_of(censorship: np.ndarray) -> np.ndarray:
    """Event indicator (True = event observed) from the CLAM/MCAT censorship column (1 = censored)."""
    return np.asarray(censorship).astype(int) == 0


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index (scikit-survival); NaN when no pair is comparable (e.g. no events)."""
    event = np.asarray(event, dtype=bool)
    if event.sum() == 0 or len(event) < 2:
        return float("nan")
    try:
        # no comparable pair (e.g. all events tied at one time): sksurv divides 0 by 0, which is NaN and a
        # RuntimeWarning ("invalid value encountered in scalar divide") that would repeat for every bootstrap draw
        with np.errstate(invalid="ignore"):
            return float(concordance_index_censored(event, np.asarray(time, float), np.asarray(risk, float))[0])
    except ValueError:  # sksurv refuses non-finite inputs
        return float("nan")


def bootstrap_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, n_bootstrap: int = 1000,
                      seed: int = 0, level: float = 0.95) -> Interval:
    """C-index with a percentile bootstrap CI over slides (resampled with replacement, seeded).

    Draws without a comparable pair are skipped rather than counted as 0.5, so that the interval
    describes the C-index where it exists; `n_resamples` says how many draws were kept.
    """
    time, risk = np.asarray(time, float), np.asarray(risk, float)
    event = np.asarray(event, dtype=bool)
    estimate = c_index(time, event, risk)
    if not np.isfinite(estimate):
        return Interval(float("nan"), float("nan"), float("nan"), level, 0)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(time), len(time))
        value = c_index(time[idx], event[idx], risk[idx])
        if np.isfinite(value):
            draws.append(value)
    if not draws:
        return Interval(estimate, float("nan"), float("nan"), level, 0)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), level, len(draws))


def high_risk_mask(risk: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """True for the high-risk group: risk above `threshold` (default: the median of `risk`)."""
    risk = np.asarray(risk, float)
    return risk > (np.median(risk) if threshold is None else threshold)


def logrank_high_vs_low(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> LogRank:
    """Log-rank test between the high- and low-risk groups (lifelines); NaN when a group is empty."""
    time, event, high = np.asarray(time, float), np.asarray(event, bool), np.asarray(high, bool)
    n_high, n_low = int(high.sum()), int((~high).sum())
    if n_high == 0 or n_low == 0 or event.sum() == 0:
        return LogRank(float("nan"), float("nan"), n_high, n_low)
    result = logrank_test(time[high], time[~high], event_observed_A=event[high], event_observed_B=event[~high])
    return LogRank(float(result.p_value), float(result.test_statistic), n_high, n_low)


@dataclass(frozen=True)
class RocCurve:
    label: str  # the positive class of this one-vs-rest curve
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


def roc_curves(labels: np.ndarray, probs: np.ndarray, class_names: list[str] | None = None) -> list[RocCurve]:
    """ROC curves: one for class 1 if binary, else one-vs-rest per class present with both outcomes."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, float)
    n_classes = probs.shape[1]
    names = class_names or [str(c) for c in range(n_classes)]
    positives = [1] if n_classes == 2 else range(n_classes)
    curves = []
    for c in positives:
        truth = labels == c
        if truth.all() or not truth.any():
            log.warning("ROC for class %s skipped: the labels hold only one outcome for it", names[c])
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, c])
        curves.append(RocCurve(names[c], fpr, tpr, float(roc_auc_score(truth, probs[:, c]))))
    return curves


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present (binary: AUC of class 1); NaN if undefined."""
    curves = roc_curves(labels, probs)
    return float(np.mean([c.auc for c in curves])) if curves else float("nan")
