"""Reports from training run dirs: metrics per fold, ROC / confusion or Kaplan–Meier / log-rank / C-index CIs,
attention heatmaps; several runs (models) side by side.

    python -m wsi_pipeline.report run=runs/kirc/mamba2d
    python -m wsi_pipeline.report run=[runs/kirc/abmil,runs/kirc/mamba2d] slides=data/slides

Each run gets `<run>/report/report.md` with its PNGs; several runs also get a comparison report
(`out=`, default `<their common parent>/comparison/report.md`). The numbers come from
`wsi_pipeline.stats`, the figures from `wsi_pipeline.plots` and `wsi_pipeline.heatmap`; this module
only reads the run (through `wsi_pipeline.run_dir`), lays out the Markdown and runs the Hydra app.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import hydra
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig, ListConfig, OmegaConf
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix
from tqdm import tqdm

from wsi_pipeline import heatmap, plots, stats
from wsi_pipeline.config import CONFIG_DIR, compose_app
from wsi_pipeline.h5io import FormatError, atomic_path, read_patches
from wsi_pipeline.run_dir import Fold, ReportError, Run, event_arrays, load_run, prob_columns

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"
# The figures a run's report writes (paths relative to its folder): those a rewrite does not write again are stale.
RUN_FIGURES = tuple(re.compile(pattern) for pattern in (
    r"roc_fold\d+\.png", r"confusion\.png", r"km_fold\d+\.png", r"km_pooled\.png",
    r"heatmaps/fold\d+_(top|bottom)_.+\.png"))


# -- Markdown helpers ---------------------------------------------------------------------------------
def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def fmt_p(p: float) -> str:
    return "n/a" if not np.isfinite(p) else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")


def mean_std(values: Sequence[float]) -> str:
    """`mean ± std` over folds (population std, ddof = 0, as in the trainer's summary.csv), ignoring folds where
    the value is undefined."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return "n/a"
    return f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines + [""]


def frame_table(frame: pd.DataFrame, label: str = "fold") -> list[str]:
    """A per-fold numeric frame as a table, closed by a `mean ± std` row."""
    ints = [pd.api.types.is_integer_dtype(t) for t in frame.dtypes]  # counts stay counts
    rows = [[index, *(str(v) if is_int else fmt(v) for v, is_int in zip(row, ints))]
            for index, row in zip(frame.index, frame.itertuples(index=False))]
    rows.append(["**mean ± std**", *("" if is_int else mean_std(frame[c]) for c, is_int in zip(frame.columns, ints))])
    return md_table([label, *frame.columns], rows)


@dataclass
class Context:
    """One report being written: the run, its folder, the report config and the notes gathered on the way."""

    run: Run
    out: Path
    cfg: DictConfig
    notes: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)  # the figures saved, relative to `out`

    def note(self, message: str) -> None:
        log.warning(message)
        self.notes.append(message)

    def figure(self, fig: Figure, name: str, alt: str) -> str:
        """Save `fig` as `<out>/<name>` and return the Markdown that shows it."""
        plots.save_figure(fig, self.out / name, dpi=int(self.cfg.dpi))
        self.written.add(name)
        return f"![{alt}]({name})"

    def remove_stale_figures(self) -> None:
        """Delete the figures of an earlier report in `out` (RUN_FIGURES) that this one did not write again."""
        for path in [*self.out.glob("*.png"), *self.out.glob("heatmaps/*.png")]:
            name = path.relative_to(self.out).as_posix()
            if name not in self.written and any(p.fullmatch(name) for p in RUN_FIGURES):
                path.unlink(missing_ok=True)
                log.info("%s: removed (an earlier report's figure)", path)


# -- classification -----------------------------------------------------------------------------------
def classification_scores(frame: pd.DataFrame) -> dict[str, float]:
    labels, pred = frame["label"].to_numpy(int), frame["pred"].to_numpy(int)
    return {"n": len(frame), "accuracy": accuracy_score(labels, pred),
            "balanced accuracy": balanced_accuracy_score(labels, pred),
            "AUC": stats.macro_auc(labels, frame[prob_columns(frame)].to_numpy(float))}


def classification_section(ctx: Context) -> list[str]:
    run, names = ctx.run, ctx.run.class_names
    scores = pd.DataFrame([classification_scores(f.test) for f in run.folds], index=[f.index for f in run.folds])
    lines = ["## Test predictions", "",
             "Recomputed from `fold_<k>/predictions_test.csv` with scikit-learn. AUC: "
             + ("ROC AUC of class 1." if len(names) == 2 else "macro one-vs-rest over the classes present."), ""]
    lines += frame_table(scores)
    lines += ["### ROC curves per fold", ""]
    for fold in run.folds:
        curves = stats.roc_curves(fold.test["label"].to_numpy(int), fold.test[prob_columns(fold.test)].to_numpy(float),
                                  names)
        lines.append(ctx.figure(plots.roc_figure(curves, f"fold {fold.index} · {run.model_name}"),
                                f"roc_fold{fold.index}.png", f"ROC fold {fold.index}"))
    pooled = pd.concat([f.test for f in run.folds])
    matrix = confusion_matrix(pooled["label"].astype(int), pooled["pred"].astype(int), labels=range(len(names)))
    lines += ["", "### Confusion matrix (test predictions of all folds pooled)", "",
              ctx.figure(plots.confusion_figure(matrix, names, f"{run.model_name}: all test folds"),
                         "confusion.png", "confusion matrix"), ""]
    lines += md_table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, matrix.tolist())])
    return lines


# -- survival -----------------------------------------------------------------------------------------
def risk_groups(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time, event, high) of one fold's test predictions, high = risk above the fold's median."""
    time, event, risk = event_arrays(frame)
    return time, event, stats.high_risk_mask(risk)


def survival_fold_row(ctx: Context, fold: Fold) -> tuple[list[object], float]:
    """One fold's table row (n, events, C-index with CI, log-rank p) and its C-index (n/a: a note)."""
    cfg = ctx.cfg
    time, event, risk = event_arrays(fold.test)
    ci = stats.bootstrap_c_index(time, event, risk, int(cfg.c_index.n_bootstrap), int(cfg.c_index.seed),
                                 float(cfg.c_index.level))
    if not np.isfinite(ci.estimate):
        ctx.note(f"fold {fold.index}: C-index n/a: its {len(time)} test slides ({int(event.sum())} events) hold no "
                 "comparable pair (an event before another slide's time); the mean ± std leaves the fold out")
    test = stats.logrank_high_vs_low(*risk_groups(fold.test))
    return [fold.index, len(time), int(event.sum()), str(ci), fmt_p(test.p_value)], ci.estimate


def km_markdown(ctx: Context, groups: tuple[np.ndarray, ...], title: str, name: str) -> tuple[str, stats.LogRank]:
    """A Kaplan–Meier figure of high vs low risk with its log-rank test; returns its Markdown and the test."""
    test = stats.logrank_high_vs_low(*groups)
    return ctx.figure(plots.km_figure(*groups, test, title), name, title), test


def survival_section(ctx: Context) -> list[str]:
    run, cfg = ctx.run, ctx.cfg
    level = int(round(100 * float(cfg.c_index.level)))
    rows, estimates = zip(*(survival_fold_row(ctx, f) for f in tqdm(run.folds, desc="C-index bootstrap")))
    lines = ["## Test predictions", "",
             f"Harrell's C-index (scikit-survival) with a {level}% percentile bootstrap CI "
             f"({cfg.c_index.n_bootstrap} resamples, seed {cfg.c_index.seed}); log-rank test (lifelines) of the "
             "high- vs low-risk halves of each fold, split at the fold's median risk.", ""]
    lines += md_table(["fold", "n", "events", f"C-index [{level}% CI]", "log-rank p"],
                      [*rows, ["**mean ± std**", "", "", mean_std(estimates), ""]])
    # each fold has its own model, so risks are only comparable within a fold: pool the per-fold groups
    pooled = tuple(np.concatenate(parts) for parts in zip(*(risk_groups(f.test) for f in run.folds)))
    figure, test = km_markdown(ctx, pooled, f"{run.model_name}: all test folds", "km_pooled.png")
    lines += ["### Kaplan–Meier curves, all test folds pooled", "",
              f"Each slide is high or low risk by its own fold's median; log-rank p = {fmt_p(test.p_value)} "
              f"({test.n_high} high, {test.n_low} low).", "", figure, "", "### Kaplan–Meier curves per fold", ""]
    lines += [km_markdown(ctx, risk_groups(f.test), f"fold {f.index} · {run.model_name}", f"km_fold{f.index}.png")[0]
              for f in run.folds]
    return lines + [""]


# -- what differs between task types: one registry entry each -----------------------------------------
@dataclass(frozen=True)
class TaskKind:
    headline: str  # the metric models are compared on
    score: Callable[[pd.DataFrame], float]  # that metric on one fold's test predictions
    section: Callable[[Context], list[str]]
    rank: Callable[[pd.DataFrame], np.ndarray]  # default order of slides for heatmaps (high = "top")
    rank_name: str  # what `rank` computes, for the report's words
    describe: Callable[[pd.Series, list[str]], str]  # one slide's truth, for heatmap titles


TASK_KINDS: dict[str, TaskKind] = {
    "classification": TaskKind(
        "AUC", lambda f: classification_scores(f)["AUC"], classification_section,
        lambda f: 1.0 - f["prob_0"].to_numpy(float), "1 − prob_0",
        lambda row, names: f"label {names[int(row['label'])]}, pred {names[int(row['pred'])]}"),
    "survival": TaskKind(
        "C-index", lambda f: stats.c_index(*event_arrays(f)), survival_section,
        lambda f: f["risk"].to_numpy(float), "risk",
        lambda row, names: f"{row['survival_months']:.1f} mo, {'censored' if row['censorship'] else 'event'}"),
}


# -- metrics tables -----------------------------------------------------------------------------------
def metrics_section(ctx: Context) -> list[str]:
    run = ctx.run
    lines = ["## Metrics per fold", ""]
    if run.summary is not None:
        lines += ["Test metrics from `summary.csv` (mean ± std recomputed over the fold rows, ddof = 0):", ""]
        lines += frame_table(run.summary)
    with_json = [f for f in run.folds if f.metrics]
    if with_json:
        frame = pd.DataFrame([f.metrics for f in with_json], index=[f.index for f in with_json])
        lines += ["Per-fold `metrics.json`:", ""] + frame_table(frame)
    return lines


# -- attention heatmaps -------------------------------------------------------------------------------
def pick_slides(scores: np.ndarray, top_k: int, bottom_k: int) -> list[tuple[str, int]]:
    """(group, row index) of the top-k and bottom-k scores; a slide is never picked twice."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    top = [int(i) for i in order[:top_k]]
    bottom = [int(i) for i in order[::-1][:bottom_k] if int(i) not in top]
    return [("top", i) for i in top] + [("bottom", i) for i in bottom]


def ranking(ctx: Context) -> tuple[str, Callable[[pd.DataFrame], np.ndarray]]:
    """(name, scores of a fold's slides) slides are ranked by: `heatmaps.score` if it names a numeric predictions
    column of every fold, else (with a note when it is set) the task's default."""
    column, kind = ctx.cfg.heatmaps.score, TASK_KINDS[ctx.run.task_type]
    if column is None:
        return kind.rank_name, kind.rank
    column, tests = str(column), [f.test for f in ctx.run.folds]
    if any(column not in test.columns for test in tests):
        ctx.note(f"heatmaps.score={column}: no such predictions column; ranking slides by {kind.rank_name}")
    elif not all(pd.api.types.is_numeric_dtype(test[column]) for test in tests):
        ctx.note(f"heatmaps.score={column}: not a numeric predictions column (e.g. {tests[0][column].iloc[0]!r}); "
                 f"ranking slides by {kind.rank_name}")
    else:
        return column, lambda frame: frame[column].to_numpy(float)
    return kind.rank_name, kind.rank


def slide_heatmap(ctx: Context, fold: Fold, group: str, row: pd.Series, score: tuple[str, float],
                  attention: np.ndarray) -> str | None:
    """Markdown for one slide's heatmap, or None (with a note) when its features file is unusable."""
    hm, slide_id = ctx.cfg.heatmaps, str(row["slide_id"])
    try:
        grid = read_patches(ctx.run.features / f"{slide_id}.h5")
        canvas = heatmap.load_canvas(grid, slide_id, ctx.cfg.slides, ctx.cfg.thumbnails,
                                     float(hm.thumbnail_mpp), int(hm.max_size), note=ctx.note)
        truth = TASK_KINDS[ctx.run.task_type].describe(row, ctx.run.class_names)
        fig = heatmap.heatmap_figure(canvas, attention, grid,
                                     f"fold {fold.index} · {group} · {slide_id} · {score[0]} {score[1]:.3f} · {truth}",
                                     str(hm.cmap), float(hm.alpha))
    except FormatError as err:
        ctx.note(f"heatmap of {slide_id} (fold {fold.index}) skipped: {err}")
        return None
    return ctx.figure(fig, f"heatmaps/fold{fold.index}_{group}_{slide_id}.png", f"{slide_id} attention")


def heatmap_section(ctx: Context) -> list[str]:
    hm, run = ctx.cfg.heatmaps, ctx.run
    if not hm.enabled or int(hm.top_k) + int(hm.bottom_k) == 0:
        return []
    if run.features is None:
        ctx.note("heatmaps skipped: the run's config names no features folder; pass features=DIR")
        return []
    if not run.features.is_dir():
        origin = "features=" if ctx.cfg.features is not None else "the run's config.yaml"
        ctx.note(f"heatmaps skipped: features folder {run.features} (from {origin}) not found: looked for "
                 f"{run.features.resolve()}; a relative path is read from the current folder, so report from where "
                 "training ran or pass features=DIR")
        return []
    score_name, rank = ranking(ctx)
    lines = ["## Attention heatmaps", "",
             f"Top-{hm.top_k} and bottom-{hm.bottom_k} test slides of each fold by {score_name}; attention as its "
             "percentile within the slide, painted on each patch's lattice cell.", ""]
    for fold in tqdm(run.folds, desc="heatmaps"):
        scores = rank(fold.test)
        picks = pick_slides(scores, int(hm.top_k), int(hm.bottom_k))
        try:
            attention = heatmap.read_attention(fold.attention_path,
                                               [str(fold.test["slide_id"].iloc[i]) for _, i in picks], note=ctx.note)
        except FormatError as err:
            ctx.note(f"fold {fold.index}: heatmaps skipped: {err}")
            continue
        lines += [f"### Fold {fold.index}", ""]
        for group, i in picks:
            row = fold.test.iloc[i]
            if str(row["slide_id"]) in attention:
                shown = slide_heatmap(ctx, fold, group, row, (score_name, scores[i]), attention[str(row["slide_id"])])
                lines += [shown, ""] if shown else []
    return lines


# -- one run, several runs ----------------------------------------------------------------------------
def write_markdown(path: Path, lines: Sequence[str]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines).rstrip() + "\n")
    return path


def run_report(run: Run, out: Path, cfg: DictConfig) -> Path:
    """Write `<out>/report.md` and its figures for one run; returns the report's path."""
    ctx = Context(run, out, cfg, notes=list(run.warnings))
    kind = TASK_KINDS[run.task_type]
    left_out = f" · **left out: {', '.join(map(str, run.left_out))}** (see Notes)" if run.left_out else ""
    lines = [f"# {run.title}", "", f"Run dir: `{run.path}` · task type: {run.task_type} · "
             f"folds: {', '.join(str(f.index) for f in run.folds)}{left_out}", ""]
    lines += metrics_section(ctx) + kind.section(ctx) + heatmap_section(ctx)
    if ctx.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in ctx.notes]
    path = write_markdown(out / REPORT_NAME, lines)
    ctx.remove_stale_figures()  # only now: until the new report.md is in place, the old one shows them
    log.info("%s: %s written", run.path, path)
    return path


def run_label(run: Run, runs: Sequence[Run]) -> str:
    """The model's name, or `model (run folder)` when two runs share a model name."""
    if sum(r.model_name == run.model_name for r in runs) > 1:
        return f"{run.model_name} ({run.path.name})"
    return run.model_name


def check_comparable(runs: Sequence[Run]) -> None:
    types = {r.task_type for r in runs}
    if len(types) > 1:
        raise ReportError(f"cannot compare runs of different task types ({sorted(types)}): "
                          + ", ".join(str(r.path) for r in runs) + "; report them one at a time")


def comparison_report(runs: Sequence[Run], reports: Sequence[Path], out: Path, cfg: DictConfig) -> Path:
    """Models side by side: the headline metric per fold (recomputed) and the summary metrics they share."""
    check_comparable(runs)
    kind = TASK_KINDS[runs[0].task_type]
    labels = [run_label(r, runs) for r in runs]
    per_fold = {label: [kind.score(f.test) for f in r.folds] for label, r in zip(labels, runs)}
    shared = sorted(set.intersection(*(set(r.summary.columns) if r.summary is not None else set() for r in runs)))
    rows = [[f"[{label}]({os.path.relpath(rep, out)})", len(r.folds), mean_std(per_fold[label]),
             *(mean_std(r.summary[c]) for c in shared)] for label, r, rep in zip(labels, runs, reports)]
    ctx = Context(runs[0], out, cfg)
    lines = [f"# {runs[0].task_name}: {len(runs)} models compared", "",
             f"{kind.headline} recomputed from each fold's test predictions; other columns from `summary.csv`; "
             "mean ± std over folds.", ""]
    lines += md_table(["model", "folds", kind.headline, *shared], rows)
    lines.append(ctx.figure(plots.metric_per_fold_figure(per_fold, kind.headline), "compare_folds.png",
                            f"{kind.headline} per fold"))
    return write_markdown(out / REPORT_NAME, lines)


def as_list(value: object) -> list[str]:
    if isinstance(value, (ListConfig, list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def default_out(run_dirs: Sequence[str], out: str | None) -> str:
    """Where the report goes: `out`, else `<run>/report`, else (several runs) `<common parent>/comparison`."""
    if out:
        return str(out)
    if len(run_dirs) == 1:
        return str(Path(run_dirs[0]) / "report")
    return str(Path(os.path.commonpath([os.path.abspath(p) for p in run_dirs])) / "comparison")


def report_config(*overrides: str) -> DictConfig:
    """configs/report.yaml composed with Hydra overrides (for calling `make_reports` from Python, e.g. the demo)."""
    return compose_app("report", ["run=unused", *overrides])


def make_reports(run_dirs: Sequence[str], cfg: DictConfig | None = None) -> list[Path]:
    """Reports for every run (and a comparison when there are several); returns the written report paths.

    `cfg` is the composed report config (default: `report_config()`); its `run` is ignored here.
    """
    cfg = report_config() if cfg is None else cfg
    runs = [load_run(d, cfg.features) for d in run_dirs]
    check_comparable(runs)  # before any report is written
    single_out = cfg.out if len(runs) == 1 else None
    reports = [run_report(r, Path(default_out([str(r.path)], single_out)), cfg) for r in runs]
    if len(runs) > 1:
        reports.append(comparison_report(runs, reports, Path(default_out(run_dirs, cfg.out)), cfg))
    return reports


def run_dirs(cfg: DictConfig) -> list[str]:
    """The run dirs named by `run=`; [] when it is missing, null or empty."""
    if OmegaConf.is_missing(cfg, "run") or cfg.run is None:
        return []
    return [d for d in as_list(cfg.run) if d.strip()]


def _hydra_dir(*, _root_: DictConfig) -> str:
    """The Hydra job folder (log file, .hydra/) is the report folder itself, not ./outputs/<date>. Without run=, or
    when a run dir is not there, it is a scratch folder (Hydra creates it before `main` runs: the report folder of a
    mistyped run= would be created, and ./report by an empty one), and `main` stops with its message."""
    runs = run_dirs(_root_)
    if not runs or not all(Path(d).is_dir() for d in runs):
        return str(Path(tempfile.gettempdir()) / "wsi_pipeline_report")
    return default_out(runs, _root_.out)


OmegaConf.register_new_resolver("report_dir", _hydra_dir, replace=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    runs = run_dirs(cfg)
    if not runs:
        log.error("run= is required: python -m wsi_pipeline.report run=RUN_DIR (or run=[RUN_A,RUN_B] to compare)")
        raise SystemExit(2)
    try:
        for path in make_reports(runs, cfg):
            log.info("report: %s", path)
    except (ReportError, FormatError) as err:
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
