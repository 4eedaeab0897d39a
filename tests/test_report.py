"""Reports: statistics against independent computations, run-dir reading, the written report and its PNGs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy.stats import chi2
from sklearn.metrics import roc_auc_score

from wsi_pipeline import stats
from wsi_pipeline.h5io import FeatureGrid, write_features
from wsi_pipeline.report import make_reports, pick_slides, report_config
from wsi_pipeline.run_dir import ReportError, load_run, read_predictions

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- generated run dirs (the trainer's contract, DESIGN.md "Run outputs") ------------------------------
def survival_data(n: int, separation: float, seed: int) -> pd.DataFrame:
    """Exponential times whose hazard grows with `risk` by exp(separation * risk); ~30% censored."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    time = rng.exponential(30 * np.exp(-separation * risk))
    return pd.DataFrame({"survival_months": np.round(time + 0.1, 2), "censorship": (rng.random(n) < 0.3).astype(int),
                         "risk": risk})


def classification_data(n: int, n_classes: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = np.arange(n) % n_classes
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[label]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame({"label": label, "pred": probs.argmax(1)})
    return frame.join(pd.DataFrame(probs, columns=[f"prob_{c}" for c in range(n_classes)]))


def write_slide_features(features: Path, slide_id: str, seed: int) -> int:
    rng = np.random.default_rng(seed)
    cells = np.argwhere(rng.random((5, 7)) < 0.6)
    write_features(features / f"{slide_id}.h5", FeatureGrid(
        cells[:, ::-1] * 1024, cells, {"slide_id": slide_id, "patch_size_level0": 1024, "grid_shape": (5, 7)},
        features=rng.normal(size=(len(cells), 8)).astype(np.float16)))
    return len(cells)


def write_run(root: Path, task_type: str, model: str = "mamba2d", n_folds: int = 3, n: int = 30, seed: int = 0,
              n_classes: int = 3) -> Path:
    """A run dir as the trainer writes it: config.yaml, summary.csv, fold_<k>/{predictions_*,metrics.json,attention}."""
    run, features = root / model, root / "features"
    task = ({"type": "survival", "name": "kirc"} if task_type == "survival" else
            {"type": "classification", "name": "brca", "n_classes": n_classes,
             "label_map": {f"type_{c}": c for c in range(n_classes)}})
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": task, "model": {"name": model},
                                                     "features": str(features)}))
    rows = []
    for k in range(n_folds):
        fold = run / f"fold_{k}"
        fold.mkdir()
        data = (survival_data(n, 1.5, seed + k) if task_type == "survival"
                else classification_data(n, n_classes, seed + k))
        ids = [f"{model}_f{k}_s{i}" for i in range(n)]
        data.insert(0, "slide_id", ids)
        data.insert(0, "case_id", [f"case_{k}_{i}" for i in range(n)])
        if task_type == "survival":
            for j in range(4):
                data[f"surv_{j}"] = np.exp(-(j + 1) * np.exp(data["risk"]) / 4)
        data.to_csv(fold / "predictions_test.csv", index=False)
        data.to_csv(fold / "predictions_val.csv", index=False)
        metric = stats.c_index(*[data[c].to_numpy() for c in ("survival_months",)], data["censorship"] == 0,
                               data["risk"]) if task_type == "survival" else 0.8 + 0.01 * k
        (fold / "metrics.json").write_text(json.dumps({"test": {"score": metric}, "val": {"score": 0.7}}))
        with h5py.File(fold / "attention_test.h5", "w") as f:
            for i, sid in enumerate(ids):
                f.create_dataset(sid, data=np.random.default_rng(i).random(write_slide_features(features, sid, i))
                                 .astype(np.float32))
        rows.append({"fold": k, "score": metric, "loss": 1.0 - metric})
    summary = pd.DataFrame(rows)
    summary = pd.concat([summary, pd.DataFrame([{"fold": "mean", **summary.mean().drop("fold")},
                                                {"fold": "std", **summary.std().drop("fold")}])])
    summary.to_csv(run / "summary.csv", index=False)
    return run


def report_cfg(*overrides: str):
    return report_config("c_index.n_bootstrap=200", "heatmaps.top_k=1", "heatmaps.bottom_k=1", "dpi=60", *overrides)


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        assert min(image.size) > 50


# -- statistics against independent computations ------------------------------------------------------
def harrell(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C by brute force over pairs: i had the event first; ties in risk count 1/2."""
    concordant = comparable = 0.0
    for i in np.flatnonzero(event):
        later = time > time[i]
        comparable += later.sum()
        concordant += (risk[i] > risk[later]).sum() + 0.5 * (risk[i] == risk[later]).sum()
    return concordant / comparable


def logrank_by_hand(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> float:
    """Two-group log-rank chi-square p-value from its textbook definition (observed - expected in group 1)."""
    o_minus_e = var = 0.0
    for t in np.unique(time[event]):
        at_risk, at_risk_1 = time >= t, (time >= t) & group
        n, n1 = at_risk.sum(), at_risk_1.sum()
        d, d1 = (event & (time == t)).sum(), (event & (time == t) & group).sum()
        o_minus_e += d1 - d * n1 / n
        var += d * (n1 / n) * (1 - n1 / n) * (n - d) / max(n - 1, 1)
    return float(chi2.sf(o_minus_e**2 / var, 1))


def test_c_index_matches_brute_force_pairs():
    data = survival_data(60, 1.0, seed=3)
    time, event, risk = data["survival_months"].to_numpy(), data["censorship"].to_numpy() == 0, data["risk"].to_numpy()
    assert stats.c_index(time, event, risk) == pytest.approx(harrell(time, event, risk), abs=1e-9)
    assert stats.c_index(time, event, -risk) == pytest.approx(1 - harrell(time, event, risk), abs=1e-9)


def test_bootstrap_ci_contains_the_estimate_narrows_with_more_slides_and_is_seeded():
    def ci(n: int, seed: int = 0) -> stats.Interval:
        data = survival_data(n, 1.0, seed=11)
        return stats.bootstrap_c_index(data["survival_months"], data["censorship"] == 0, data["risk"],
                                       n_bootstrap=300, seed=seed)
    small, large = ci(40), ci(400)
    for interval in (small, large):
        assert interval.low < interval.estimate < interval.high and interval.n_resamples == 300
    assert large.high - large.low < 0.6 * (small.high - small.low)
    assert ci(40) == small and ci(40, seed=1) != small


def test_c_index_is_nan_without_events():
    interval = stats.bootstrap_c_index(np.arange(1.0, 6.0), np.zeros(5, bool), np.arange(5.0), n_bootstrap=10)
    assert np.isnan(interval.estimate) and str(interval) == "n/a"


def test_logrank_small_on_separated_groups_large_on_identical_ones():
    rng = np.random.default_rng(0)
    high = np.repeat([True, False], 50)
    time = np.where(high, rng.exponential(5, 100), rng.exponential(40, 100))
    event = rng.random(100) < 0.8
    separated = stats.logrank_high_vs_low(time, event, high)
    assert separated.p_value < 1e-4 and (separated.n_high, separated.n_low) == (50, 50)
    assert separated.p_value == pytest.approx(logrank_by_hand(time, event, high), rel=1e-6)
    same = stats.logrank_high_vs_low(np.tile(time[:50], 2), np.tile(event[:50], 2), high)
    assert same.p_value > 0.99


def test_high_risk_mask_splits_at_the_median():
    risk = np.array([0.3, -1.0, 2.0, 0.1, 5.0, -0.2])
    assert stats.high_risk_mask(risk).tolist() == [True, False, True, False, True, False]
    assert np.isnan(stats.logrank_high_vs_low(np.ones(4), np.ones(4, bool), np.zeros(4, bool)).p_value)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_roc_auc_equals_sklearn(n_classes):
    data = classification_data(80, n_classes, seed=5)
    labels, probs = data["label"].to_numpy(), data[[f"prob_{c}" for c in range(n_classes)]].to_numpy()
    curves = stats.roc_curves(labels, probs)
    if n_classes == 2:
        assert len(curves) == 1 and curves[0].auc == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    else:
        assert [c.auc for c in curves] == pytest.approx(
            [roc_auc_score(labels == c, probs[:, c]) for c in range(n_classes)])
        assert stats.macro_auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert all(c.fpr[0] == 0 and c.tpr[-1] == 1 for c in curves)


def test_pick_slides_top_and_bottom_without_repeats():
    assert pick_slides(np.array([0.2, 0.9, 0.5, 0.1]), 1, 2) == [("top", 1), ("bottom", 3), ("bottom", 0)]
    assert pick_slides(np.array([0.2, 0.9]), 2, 2) == [("top", 1), ("top", 0)]


# -- bad input ----------------------------------------------------------------------------------------
def test_run_without_test_predictions_names_the_dir(tmp_path):
    (tmp_path / "run" / "fold_0").mkdir(parents=True)
    with pytest.raises(ReportError, match=r"run: no fold_<k>/predictions_test.csv"):
        load_run(tmp_path / "run")


def test_stale_folds_and_unreadable_optional_files_are_left_out_with_a_warning(tmp_path):
    """A fold trained with other settings than the run's config.yaml (another fold retrained with overwrite=true) is
    not reported next to the others; a metrics.json that is not the trainer's object and an empty summary.csv are
    warnings, not tracebacks."""
    run = write_run(tmp_path, "survival", n_folds=3)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    (run / "fold_0" / "config.yaml").write_text(yaml.safe_dump(recorded))
    (run / "fold_1" / "config.yaml").write_text(yaml.safe_dump({**recorded, "train": {"epochs": 1}}))
    (run / "fold_2" / "metrics.json").write_text("[1, 2]")
    (run / "summary.csv").write_text("")
    loaded = load_run(run)
    assert [f.index for f in loaded.folds] == [0, 2] and loaded.summary is None
    assert any("fold_1: trained with other values of ['train.epochs']" in w for w in loaded.warnings)
    assert any("fold_2/metrics.json: holds a list" in w for w in loaded.warnings)
    assert any("summary.csv: cannot read it as CSV" in w for w in loaded.warnings)


def test_predictions_missing_columns_name_the_file_and_columns(tmp_path):
    path = tmp_path / "predictions_test.csv"
    pd.DataFrame({"case_id": ["a"], "slide_id": ["a"], "survival_months": [3.0]}).to_csv(path, index=False)
    with pytest.raises(ReportError, match=r"predictions_test.csv: missing column\(s\) \['censorship', 'risk'\]"):
        read_predictions(path, "survival")
    with pytest.raises(ReportError, match=r"'label', 'pred', 'prob_0"):
        read_predictions(path, "classification")


@pytest.mark.parametrize("column, value, message", [
    ("risk", np.nan, r"column\(s\) \['risk'\] hold empty or non-numeric values"),
    ("censorship", 2, r"censorship must be 1 \(censored\) or 0 \(event observed\), found \[0, 1, 2\]"),
])
def test_predictions_with_bad_values_name_the_file(tmp_path, column, value, message):
    path = tmp_path / "predictions_test.csv"
    data = survival_data(6, 1.0, seed=0).assign(case_id="c", slide_id="s")
    data.loc[0, column] = value
    data.to_csv(path, index=False)
    with pytest.raises(ReportError, match=r"predictions_test.csv: " + message):
        read_predictions(path, "survival")


def test_class_labels_outside_the_prob_columns_are_refused(tmp_path):
    path = tmp_path / "predictions_test.csv"
    classification_data(6, 2, seed=0).assign(case_id="c", slide_id="s", label=[0, 1, 2, 0, 1, 0]).to_csv(path)
    with pytest.raises(ReportError, match=r"label and pred must be class indices 0 … 1"):
        read_predictions(path, "classification")


# -- whole reports ------------------------------------------------------------------------------------
def test_survival_report_lists_every_fold_with_its_numbers_and_plots(tmp_path):
    run = write_run(tmp_path, "survival", n_folds=3)
    [report] = make_reports([str(run)], report_cfg())
    text = report.read_text()
    assert report == run / "report" / "report.md"
    for k in range(3):
        test = pd.read_csv(run / f"fold_{k}" / "predictions_test.csv")
        expected = stats.c_index(test["survival_months"], test["censorship"] == 0, test["risk"])
        assert f"| {k} | 30 | {int((test['censorship'] == 0).sum())} | {expected:.3f} [" in text
        for name in (f"km_fold{k}.png", f"roc_fold{k}.png"):
            assert (name in text) == name.startswith("km")
        assert_png(run / "report" / f"km_fold{k}.png")
        heatmaps = sorted((run / "report" / "heatmaps").glob(f"fold{k}_*.png"))
        assert len(heatmaps) == 2 and all(p.name in text for p in heatmaps)
        for p in heatmaps:
            assert_png(p)
    assert_png(run / "report" / "km_pooled.png")
    assert "## Notes" not in text  # nothing was missing


def test_classification_report_has_roc_per_fold_and_pooled_confusion(tmp_path):
    run = write_run(tmp_path, "classification", n_folds=2, n=24, n_classes=3)
    [report] = make_reports([str(run)], report_cfg("heatmaps.enabled=false"))
    text = report.read_text()
    assert "| type_0 | type_1 | type_2 |" in text  # class names from the label map
    pooled = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions_test.csv") for k in range(2))
    assert f"| type_0 | {sum((pooled.label == 0) & (pooled.pred == 0))} |" in text
    for k in range(2):
        test = pd.read_csv(run / f"fold_{k}" / "predictions_test.csv")
        auc = roc_auc_score(test["label"], test[["prob_0", "prob_1", "prob_2"]], multi_class="ovr")
        assert f"| {k} | 24 |" in text and f"{auc:.3f}" in text
        assert_png(run / "report" / f"roc_fold{k}.png")
    assert_png(run / "report" / "confusion.png")
    assert "| **mean ± std** | 0.805 ± 0.007 | 0.195 ± 0.007 |" in text  # summary.csv fold rows


def test_missing_attention_and_features_are_notes_and_the_rest_is_written(tmp_path):
    run = write_run(tmp_path, "survival", n_folds=2, n=12)
    (run / "fold_0" / "attention_test.h5").unlink()
    for path in (tmp_path / "features").glob("mamba2d_f1_*.h5"):
        path.unlink()
    [report] = make_reports([str(run)], report_cfg())
    text = report.read_text()
    assert "fold 0: heatmaps skipped:" in text and "attention_test.h5: no such file" in text
    assert "heatmap of mamba2d_f1_" in text and ".h5: no such file" in text
    assert "| 0 | 12 |" in text and "| 1 | 12 |" in text
    assert_png(run / "report" / "km_fold1.png")


def test_cli_compares_two_models_and_fails_clearly_on_a_bad_run(tmp_path):
    runs = [write_run(tmp_path, "survival", model=m, n_folds=2, n=20, seed=s) for m, s in (("abmil", 0), ("mamba2d", 7))]
    cmd = [sys.executable, "-m", "wsi_pipeline.report", f"run=[{runs[0]},{runs[1]}]", "c_index.n_bootstrap=50",
           "heatmaps.enabled=false"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    comparison = (tmp_path / "comparison" / "report.md").read_text()
    assert "[abmil](../abmil/report/report.md)" in comparison and "[mamba2d](" in comparison
    assert_png(tmp_path / "comparison" / "compare_folds.png")
    assert (tmp_path / "comparison" / "report.log").is_file() and not (REPO / "outputs").exists()
    for run in runs:
        assert (run / "report" / "report.md").is_file()
    bad = subprocess.run([sys.executable, "-m", "wsi_pipeline.report", f"run={tmp_path / 'features'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert f"{tmp_path / 'features'}: no fold_<k>/predictions_test.csv" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "wsi_pipeline.report"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert usage.returncode == 2 and "run= is required" in usage.stderr + usage.stdout
