"""Reports: statistics against independent computations, run-dir reading, the written report and its PNGs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
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
                                                {"fold": "std", **summary.std(ddof=0).drop("fold")}])])
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


def test_c_index_without_a_comparable_pair_is_nan_without_a_warning():
    """All events at one time: no pair is comparable, sksurv divides 0 by 0; that must not warn (it would for
    every bootstrap draw of every report)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(stats.c_index(np.ones(3), np.ones(3, bool), np.arange(3.0)))


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


def test_unreadable_config_yaml_is_a_warning(tmp_path):
    """The run's config.yaml (optional) that is not YAML, or not a mapping, is left out with a warning naming it; so
    is a fold's (the fold then counts as trained with the run's settings)."""
    run = write_run(tmp_path, "survival", n_folds=2, n=12)
    (run / "fold_0" / "config.yaml").write_text("task: [unclosed\n")
    loaded = load_run(run)
    assert [f.index for f in loaded.folds] == [0, 1] and loaded.task_name == "kirc"
    assert any(w.startswith(f"{run / 'fold_0' / 'config.yaml'}: not valid YAML (") and
               w.endswith("the fold is taken as trained with the run's settings") for w in loaded.warnings)
    for text, problem in (("task: [unclosed\n", "not valid YAML ("), ("- a\n- b\n", "holds a ListConfig")):
        (run / "config.yaml").write_text(text)
        loaded = load_run(run)
        assert loaded.task_type == "survival" and [f.index for f in loaded.folds] == [0, 1]
        assert any(w.startswith(f"{run / 'config.yaml'}: {problem}") for w in loaded.warnings)


def test_empty_predictions_without_a_config_name_the_file(tmp_path):
    run = write_run(tmp_path, "survival", n_folds=2, n=12)
    (run / "config.yaml").unlink()
    (run / "fold_0" / "predictions_test.csv").write_text("")
    with pytest.raises(ReportError, match=r"fold_0/predictions_test.csv: cannot read it as CSV"):
        load_run(run)


def test_predictions_missing_columns_name_the_file_and_columns(tmp_path):
    path = tmp_path / "predictions_test.csv"
    pd.DataFrame({"case_id": ["a"], "slide_id": ["a"], "survival_months": [3.0]}).to_csv(path, index=False)
    with pytest.raises(ReportError, match=r"predictions_test.csv: missing column\(s\) \['censorship', 'risk'\]"):
        read_predictions(path, "survival")
    with pytest.raises(ReportError, match=r"'label', 'pred', 'prob_0"):
        read_predictions(path, "classification")


@pytest.mark.parametrize("column, value, message", [
    ("risk", np.nan, r"column\(s\) \['risk'\] hold empty, infinite or non-numeric values"),
    ("risk", np.inf, r"column\(s\) \['risk'\] hold empty, infinite or non-numeric values"),
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
    assert "| **mean ± std** | 0.805 ± 0.005 | 0.195 ± 0.005 |" in text  # summary.csv fold rows, ddof 0


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


def test_folds_left_out_are_named_in_the_header_and_the_notes(tmp_path, monkeypatch):
    """A killed fold (its dir holds no predictions_test.csv) and a split never trained are not reported silently."""
    run = write_run(tmp_path, "survival", n_folds=3, n=12)
    (run / "fold_2" / "predictions_test.csv").unlink()
    (tmp_path / "splits").mkdir()
    for k in range(4):
        (tmp_path / "splits" / f"splits_{k}.csv").write_text("train,val,test\n")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["task"]["splits_dir"] = "splits"  # relative: read from the current folder, as the trainer does
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    [report] = make_reports([str(run)], report_cfg("heatmaps.enabled=false"))
    text = report.read_text()
    assert "folds: 0, 1 · **left out: 2, 3** (see Notes)" in text
    notes = text.split("## Notes")[1]
    assert f"{run / 'fold_2'}: no predictions_test.csv (fold 2 was killed, failed or is still training)" in notes
    assert f"splits/splits_3.csv: fold 3 has a split but no {run / 'fold_3'} (never trained)" in notes
    assert "splits_2.csv" not in notes  # fold 2 is noted once, for its dir


def test_survival_fold_without_a_c_index_is_a_note(tmp_path):
    run = write_run(tmp_path, "survival", n_folds=2, n=12)
    path = run / "fold_1" / "predictions_test.csv"
    pd.read_csv(path).assign(censorship=1).to_csv(path, index=False)  # no event: no comparable pair
    [report] = make_reports([str(run)], report_cfg("heatmaps.enabled=false"))
    text = report.read_text()
    assert "| 1 | 12 | 0 | n/a |" in text
    assert "- fold 1: C-index n/a: its 12 test slides (0 events) hold no comparable pair" in text


def test_heatmap_score_must_name_a_numeric_column(tmp_path):
    run = write_run(tmp_path, "survival", n_folds=2, n=8)
    [report] = make_reports([str(run)], report_cfg("heatmaps.score=case_id"))
    text = report.read_text()
    assert text.count("heatmaps.score=case_id: not a numeric predictions column") == 1  # once, not per fold
    assert "test slides of each fold by risk;" in text
    assert len(list((run / "report" / "heatmaps").glob("*.png"))) == 4


def test_missing_thumbnail_and_attention_of_picked_slides_are_notes(tmp_path):
    run = write_run(tmp_path, "survival", n_folds=1, n=8)
    test = pd.read_csv(run / "fold_0" / "predictions_test.csv")
    top, bottom = test.slide_id[test.risk.idxmax()], test.slide_id[test.risk.idxmin()]
    thumbs = tmp_path / "thumbs"
    thumbs.mkdir()
    for slide_id in test.slide_id.drop(test.risk.idxmax()):
        Image.new("RGB", (70, 50), (200, 120, 160)).save(thumbs / f"{slide_id}.jpg")
    with h5py.File(run / "fold_0" / "attention_test.h5", "a") as f:
        del f[bottom]
    [report] = make_reports([str(run)], report_cfg(f"thumbnails={thumbs}"))
    notes = report.read_text().split("## Notes")[1]
    assert f"- {thumbs}: no thumbnail for {top}; drawing on a blank canvas" in notes
    assert f"attention_test.h5: no attention for 1 slide(s): {bottom}; no heatmap for them" in notes
    assert notes.count("no thumbnail") == 1


def test_features_folder_not_found_names_the_path_looked_for(tmp_path, monkeypatch):
    run = write_run(tmp_path, "survival", n_folds=2, n=8)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "features": "features"}))  # relative to tmp_path
    monkeypatch.chdir(run)  # not where training ran
    [report] = make_reports([str(run)], report_cfg())
    text = report.read_text()
    assert (f"heatmaps skipped: features folder features (from the run's config.yaml) not found: looked for "
            f"{run / 'features'};") in text
    assert "heatmap of" not in text  # one note, not one per slide


def test_rewriting_a_report_removes_its_own_stale_figures_only(tmp_path):
    run = write_run(tmp_path, "survival", n_folds=1, n=8)
    out = run / "report"
    (out / "heatmaps").mkdir(parents=True)
    for name in ("heatmaps/fold7_top_old.png", "km_fold7.png", "confusion.png", "heatmaps/mine.png", "notes.png"):
        (out / name).write_bytes(PNG_MAGIC)
    [report] = make_reports([str(run)], report_cfg())
    text, left = report.read_text(), {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert {"heatmaps/mine.png", "notes.png"} <= left  # not the report's: kept
    assert left - {"heatmaps/mine.png", "notes.png"} == {n for n in left if f"]({n})" in text}
    assert not {"heatmaps/fold7_top_old.png", "km_fold7.png", "confusion.png"} & left  # stale: gone


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


def test_runs_of_different_task_types_fail_before_any_report_is_written(tmp_path):
    runs = [write_run(tmp_path, "survival", model="a", n_folds=1, n=8),
            write_run(tmp_path, "classification", model="b", n_folds=1, n=8)]
    with pytest.raises(ReportError, match=r"cannot compare runs of different task types"):
        make_reports([str(r) for r in runs], report_cfg())
    assert not any((r / "report").exists() for r in runs)


def test_cli_with_a_missing_or_empty_run_fails_without_creating_folders(tmp_path):
    """Hydra makes its job folder (the report folder) before main runs: not for a run dir that is not there."""
    missing = tmp_path / "runs" / "typo"
    done = subprocess.run([sys.executable, "-m", "wsi_pipeline.report", f"run={missing}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and output.count(f"{missing}: not a folder") == 1 and "Traceback" not in output
    assert not (tmp_path / "runs").exists()
    empty = subprocess.run([sys.executable, "-m", "wsi_pipeline.report", "run="], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert empty.returncode == 2 and "run= is required" in empty.stdout + empty.stderr
    assert list(tmp_path.iterdir()) == []  # no ./report/.hydra


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_report_requires_run():
    done = subprocess.run(["make", "-n", "-C", str(REPO), "report", "RUN="], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "RUN= is required" in done.stderr
    assert "wsi_pipeline.report" not in done.stdout
