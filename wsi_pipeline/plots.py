"""The figures of a report: ROC curves, confusion matrix, Kaplan–Meier curves, metric per fold.

Each function takes plain arrays and returns a `matplotlib.figure.Figure` built without pyplot's
global state (so reports can be made in a loop, in threads, or headless: Agg is the only canvas).
`save_figure` writes a PNG atomically and releases the figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: the report never opens a window

import numpy as np  # noqa: E402
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.plotting import add_at_risk_counts  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from wsi_pipeline.h5io import atomic_path  # noqa: E402
from wsi_pipeline.stats import LogRank, RocCurve  # noqa: E402

HIGH_COLOUR, LOW_COLOUR = "#c0392b", "#2471a3"


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as a PNG at `path` (atomically) and drop its canvas."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    fig.clear()
    return path


def roc_figure(curves: Sequence[RocCurve], title: str = "ROC") -> Figure:
    """ROC curves with their AUC in the legend, and the chance diagonal."""
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.add_subplot()
    for curve in curves:
        ax.plot(curve.fpr, curve.tpr, lw=1.6, label=f"{curve.label} (AUC = {curve.auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate", title=title)
    ax.set_aspect("equal")
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Counts, with each cell shaded by its share of the true class (row-normalised)."""
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.2 + 0.55 * len(class_names)
    fig = Figure(figsize=(size + 0.8, size))
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=9,
                color="white" if shares[i, j] > 0.6 else "black")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    return fig


def km_figure(time: np.ndarray, event: np.ndarray, high: np.ndarray, test: LogRank,
              title: str = "Kaplan–Meier", time_unit: str = "months") -> Figure:
    """Kaplan–Meier curves of the high- and low-risk groups, with CIs, at-risk counts and the log-rank p."""
    time, event, high = np.asarray(time, float), np.asarray(event, bool), np.asarray(high, bool)
    fig = Figure(figsize=(5.6, 4.8))
    ax = fig.add_subplot()
    fitters = []
    for mask, name, colour in ((high, "high risk", HIGH_COLOUR), (~high, "low risk", LOW_COLOUR)):
        if mask.any():
            kmf = KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})").fit(time[mask], event[mask])
            kmf.plot_survival_function(ax=ax, ci_show=True, show_censors=True, color=colour,
                                       censor_styles={"marker": "|", "ms": 6})
            fitters.append(kmf)
    p_text = "n/a" if not np.isfinite(test.p_value) else f"{test.p_value:.2g}"
    ax.legend(title=f"log-rank p = {p_text}", fontsize=8, title_fontsize=8, loc="upper right")
    ax.set(ylim=(0, 1.02), xlabel=f"Time ({time_unit})", ylabel="Survival probability", title=title)
    if fitters:
        add_at_risk_counts(*fitters, ax=ax, fig=fig, rows_to_show=["At risk"])
    return fig


def metric_per_fold_figure(values: Mapping[str, Sequence[float]], metric: str) -> Figure:
    """One column per model: every fold as a dot, the mean as a dash (comparison reports)."""
    names = list(values)
    fig = Figure(figsize=(1.6 + 1.1 * len(names), 3.8))
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        folds = np.asarray(values[name], float)
        ax.hlines(np.nanmean(folds), i - 0.3, i + 0.3, color="#c0392b", lw=2)
        ax.scatter(np.full(len(folds), i) + np.linspace(-0.12, 0.12, len(folds)), folds, color="#34495e", zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set(ylabel=metric, title=f"{metric} per fold")
    return fig
