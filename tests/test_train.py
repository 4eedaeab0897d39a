"""The trainer end to end on a small generated cohort: run-dir files, resume, determinism, bad input, the CLI."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from wsi_pipeline.data import DataError
from wsi_pipeline.feature_grids import write_cohort
from wsi_pipeline.h5io import FeatureGrid, read_features, write_features
from wsi_pipeline.models import create_model
from wsi_pipeline import train as train_module
from wsi_pipeline.train import NonFiniteLoss, NonFiniteOutput, RunDirMismatch, compose_config, run_fold

CLASSIFICATION_COLUMNS = ["case_id", "slide_id", "label", "pred", "prob_0", "prob_1"]
SURVIVAL_COLUMNS = ["case_id", "slide_id", "survival_months", "censorship", "risk", "surv_0", "surv_1"]


# Tiny tensors: one torch thread is as fast, and does not spin against other processes on a busy 2-core box.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), n_cases=16, k=2)


@pytest.fixture(scope="module")
def survival_cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("surv"), n_cases=16, k=2, survival=True)


def overrides(cohort, run_dir, model="abmil", task="demo", *extra) -> list[str]:
    return [f"task={task}", f"model={model}", f"features={cohort.features}", f"task.labels_csv={cohort.labels}",
            f"task.splits_dir={cohort.splits}", f"run_dir={run_dir}", "model.d_model=16", "model.dropout=0.1",
            "train.epochs=2", "train.lr=1e-3", "train.cache=true", "train.workers=0", *extra]


def test_a_fold_writes_the_design_files(cohort, tmp_path):
    # device=cpu: the reload check below recomputes in fp32 on the CPU (on a GPU the trainer uses bf16 autocast)
    cfg = compose_config(overrides(cohort, tmp_path / "run", "mamba2d", "demo", "device=cpu"))
    metrics = run_fold(cfg)
    fold = tmp_path / "run" / "fold_0"
    test = pd.read_csv(fold / "predictions_test.csv", dtype={"case_id": str, "slide_id": str})
    assert list(pd.read_csv(fold / "predictions_val.csv").columns) == CLASSIFICATION_COLUMNS
    assert list(test.columns) == CLASSIFICATION_COLUMNS
    assert np.allclose(test[["prob_0", "prob_1"]].sum(axis=1), 1, atol=1e-5)
    assert json.loads((fold / "metrics.json").read_text())["test"] == metrics["test"]
    assert set(metrics["test"]) == {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc"}
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.features == str(cohort.features) and saved.task.type == "classification" and "fold" not in saved
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert summary.fold.astype(str).tolist() == ["0", "mean", "std"]
    with h5py.File(fold / "attention_test.h5", "r") as f:
        assert sorted(f) == sorted(test.slide_id)
        for slide_id in test.slide_id:
            weights = f[slide_id][:]
            assert weights.dtype == np.float32 and weights.sum() == pytest.approx(1, abs=1e-4)
            assert weights.shape == (len(read_features(cohort.features / f"{slide_id}.h5").grid),)
    checkpoint = torch.load(fold / "model.pt", weights_only=False)
    model = create_model(checkpoint["model"], in_dim=checkpoint["in_dim"], n_classes=checkpoint["n_classes"],
                         **checkpoint["model_cfg"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    first = read_features(cohort.features / f"{test.slide_id[0]}.h5")
    with torch.no_grad():
        logits = model(torch.from_numpy(first.features.astype(np.float32)), torch.from_numpy(first.grid)).logits
    assert torch.softmax(logits, -1)[1].item() == pytest.approx(test.prob_1[0], abs=1e-5)


def test_survival_fold_and_same_config_gives_same_metrics(survival_cohort, tmp_path):
    runs = [run_fold(compose_config(overrides(survival_cohort, tmp_path / name, "mamba2d", "demo_survival")))
            for name in ("a", "b")]
    assert runs[0]["test"] == runs[1]["test"] and runs[0]["train_loss"] == runs[1]["train_loss"]
    test = pd.read_csv(tmp_path / "a" / "fold_0" / "predictions_test.csv")
    assert list(test.columns) == SURVIVAL_COLUMNS
    assert np.allclose(test.risk, -(test.surv_0 + test.surv_1), atol=1e-5)
    assert 0 <= runs[0]["test"]["c_index"] <= 1


def test_a_resumed_sweep_skips_finished_folds(cohort, tmp_path):
    for fold in (0, 1):
        assert run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", f"fold={fold}"))) is not None
    checkpoint = tmp_path / "fold_0" / "model.pt"
    stamp = checkpoint.stat().st_mtime_ns
    (tmp_path / "summary.csv").unlink()
    assert run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", "fold=0"))) is None
    assert checkpoint.stat().st_mtime_ns == stamp
    summary = pd.read_csv(tmp_path / "summary.csv", index_col="fold")  # rebuilt from the fold dirs present
    assert list(summary.index) == ["0", "1", "mean", "std"]
    assert summary.loc["mean", "accuracy"] == pytest.approx(summary.loc[["0", "1"], "accuracy"].astype(float).mean())
    with pytest.raises(RunDirMismatch, match="train"):
        run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", "fold=1", "train.lr=0.5")))


class Killed(BaseException):
    pass


def test_a_fold_killed_mid_training_resumes_from_its_last_epoch(cohort, tmp_path, monkeypatch):
    """Kill a 4-epoch fold during epoch 2; the re-run trains only epochs 2-3 and ends where an unkilled run ends."""
    extra = ("train.epochs=4", "model.dropout=0.3")  # dropout: the resumed run must restore the RNG too
    whole = run_fold(compose_config(overrides(cohort, tmp_path / "whole", "mamba2d", "demo", *extra)))
    real_epoch, epochs_run, kills = train_module.train_epoch, [], []

    def killed_at_epoch_2(*args, **kwargs):
        epoch = args[5]
        epochs_run.append(epoch)
        if epoch == 2 and not kills:
            kills.append(epoch)
            raise Killed  # a BaseException, as a kill or Ctrl-C: no handler of the trainer's gets to clean up
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", killed_at_epoch_2)
    cfg = compose_config(overrides(cohort, tmp_path / "killed", "mamba2d", "demo", *extra))
    with pytest.raises(Killed):
        run_fold(cfg)
    assert (tmp_path / "killed" / "fold_0" / "resume.pt").is_file()
    epochs_run.clear()
    resumed = run_fold(cfg)
    assert epochs_run == [2, 3]
    assert resumed["train_loss"] == whole["train_loss"] and resumed["test"] == whole["test"]
    assert resumed["best_epoch"] == whole["best_epoch"]
    assert not (tmp_path / "killed" / "fold_0" / "resume.pt").exists()  # a finished fold keeps no resume state
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "killed" / "fold_0" / "predictions_test.csv"),
                                  pd.read_csv(tmp_path / "whole" / "fold_0" / "predictions_test.csv"))


def test_nan_loss_stops_names_the_slide_and_keeps_the_good_checkpoint(cohort, tmp_path):
    run_fold(compose_config(overrides(cohort, tmp_path / "run", "abmil")))
    good = torch.load(tmp_path / "run" / "fold_0" / "model.pt", weights_only=False)["state_dict"]
    poisoned = tmp_path / "features"
    shutil.copytree(cohort.features, poisoned)
    train_case = pd.read_csv(cohort.splits / "splits_0.csv", dtype=str)["train"].dropna().iloc[0]
    slide_id = train_case.replace("case", "slide")
    grid = read_features(poisoned / f"{slide_id}.h5")
    grid.features[:] = np.nan
    write_features(poisoned / f"{slide_id}.h5", grid)
    cfg = compose_config(overrides(cohort, tmp_path / "run", "abmil", "demo", f"features={poisoned}", "overwrite=true"))
    with pytest.raises(NonFiniteLoss, match=rf"slide {slide_id} at epoch 0, step \d+"):
        run_fold(cfg)
    kept = torch.load(tmp_path / "run" / "fold_0" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(good[k], kept[k]) for k in good)
    assert not (tmp_path / "run" / "fold_0" / "metrics.json").exists()


def _poisoned_copy(cohort, folder, split: str):
    """A copy of the cohort's features with the first slide of `split` (fold 0) all NaN; returns (folder, slide id)."""
    shutil.copytree(cohort.features, folder)
    case = pd.read_csv(cohort.splits / "splits_0.csv", dtype=str)[split].dropna().iloc[0]
    slide_id = case.replace("case", "slide")
    grid = read_features(folder / f"{slide_id}.h5")
    grid.features[:] = np.nan
    write_features(folder / f"{slide_id}.h5", grid)
    return folder, slide_id


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_nan_output_on_a_val_or_test_slide_stops_and_names_it(cohort, tmp_path, split):
    """Not NaN probabilities written and scored (argmax of NaN is class 0): the run stops naming the slide and the
    split. Found at the test split, the training is kept (resume.pt): the re-run after the fix does not retrain."""
    poisoned, slide_id = _poisoned_copy(cohort, tmp_path / "features", split)
    cfg = compose_config(overrides(cohort, tmp_path / "run", "abmil", "demo", f"features={poisoned}"))
    where = "val split, epoch 0" if split == "val" else "test split, after training"
    with pytest.raises(NonFiniteOutput, match=rf"not finite on slide {slide_id} \({where}\)"):
        run_fold(cfg)
    fold = tmp_path / "run" / "fold_0"
    assert not (fold / "metrics.json").exists() and (fold / "resume.pt").is_file() == (split == "test")


def test_a_kill_during_the_evaluation_keeps_the_training(cohort, tmp_path, monkeypatch):
    cfg = compose_config(overrides(cohort, tmp_path, "abmil"))
    real_write = train_module._write_attention

    def killed(*args):
        raise Killed

    monkeypatch.setattr(train_module, "_write_attention", killed)
    with pytest.raises(Killed):
        run_fold(cfg)
    monkeypatch.setattr(train_module, "_write_attention", real_write)
    epochs_run = []
    real_epoch = train_module.train_epoch
    monkeypatch.setattr(train_module, "train_epoch", lambda *a, **k: epochs_run.append(a[5]) or real_epoch(*a, **k))
    assert run_fold(cfg) is not None and epochs_run == []  # straight to the evaluation
    assert (tmp_path / "fold_0" / "metrics.json").is_file() and not (tmp_path / "fold_0" / "resume.pt").exists()


def test_run_dir_settings_are_checked_per_fold(cohort, tmp_path, caplog):
    """A failed start (a typo in features=) does not lock the run dir; where and how fast a fold runs may change on
    resume; a fold retrained with overwrite=true and other settings makes the others stale: out of summary.csv,
    and refused when re-run without overwrite=true."""
    with pytest.raises(DataError, match="no features"):
        run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", f"features={tmp_path}/typo")))
    for fold in (0, 1):
        run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", f"fold={fold}")))
    assert run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", "fold=1", "train.workers=1",
                                             "train.cache=false", "device=cpu"))) is None
    with caplog.at_level(logging.WARNING):
        run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", "fold=0", "overwrite=true",
                                          "train.epochs=1")))
    assert "fold_1 trained with other settings" in caplog.text
    assert pd.read_csv(tmp_path / "summary.csv").fold.astype(str).tolist() == ["0", "mean", "std"]
    with pytest.raises(RunDirMismatch, match=r"fold_1 trained with other values of \['train.epochs'\]"):
        run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", "fold=1", "train.epochs=1")))
    run_fold(compose_config(overrides(cohort, tmp_path, "abmil", "demo", "fold=1", "train.epochs=1",
                                      "overwrite=true")))
    assert pd.read_csv(tmp_path / "summary.csv").fold.astype(str).tolist() == ["0", "1", "mean", "std"]


def test_missing_skip_trains_without_a_case_whose_slides_have_no_features(cohort, tmp_path):
    features = tmp_path / "features"
    shutil.copytree(cohort.features, features)
    case = pd.read_csv(cohort.splits / "splits_0.csv", dtype=str)["train"].dropna().iloc[0]
    (features / f"{case.replace('case', 'slide')}.h5").unlink()
    metrics = run_fold(compose_config(overrides(cohort, tmp_path / "run", "abmil", "demo", f"features={features}",
                                                "missing=skip")))
    assert metrics is not None and (tmp_path / "run" / "fold_0" / "metrics.json").is_file()


def test_metrics_json_is_strict_json_when_a_metric_is_undefined(cohort, tmp_path, caplog):
    """A validation split of one class: its AUC is undefined every epoch. metrics.json holds null (JSON has no NaN),
    and the log says the last epoch's model was kept for want of a validation score."""
    labels = pd.read_csv(cohort.labels, dtype=str)
    by_class = [sorted(labels[labels.label == name].case_id) for name in sorted(labels.label.unique())]
    val, test = by_class[0][:2], by_class[0][2:4] + by_class[1][:2]
    train = [c for c in labels.case_id if c not in val + test]
    splits = tmp_path / "splits"
    splits.mkdir()
    pd.DataFrame({"train": pd.Series(train), "val": pd.Series(val), "test": pd.Series(test)}).to_csv(
        splits / "splits_0.csv", index=False)
    with caplog.at_level(logging.WARNING):
        run_fold(compose_config(overrides(cohort, tmp_path / "run", "abmil", "demo", f"task.splits_dir={splits}")))
    text = (tmp_path / "run" / "fold_0" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds a bare {name}"))
    assert metrics["val"]["macro_auc"] is None and metrics["best_epoch"] == 1
    assert "validation macro_auc was not a number at any epoch" in caplog.text


@pytest.mark.parametrize("bad", ["empty", "truncated"])
def test_a_bad_slide_file_read_by_a_worker_is_one_clear_line(tmp_path, bad):
    """A feature file without patches, or cut short, read by a DataLoader worker (train.workers=2): the CLI ends
    with that file's message on one line (no worker traceback pasted into it), exit code 1, and no fold files."""
    cohort = write_cohort(tmp_path / "cohort", n_cases=16, k=2)
    target = sorted(cohort.features.glob("*.h5"))[0]
    if bad == "empty":
        stored = read_features(target)
        write_features(target, FeatureGrid(stored.coords[:0], stored.grid[:0], stored.attrs,
                                           features=stored.features[:0]))
    else:
        target.write_bytes(target.read_bytes()[:200])
    args = overrides(cohort, tmp_path / "run", "mamba2d", "demo", "train.epochs=1", "train.workers=2",
                     "train.cache=false", "device=cpu")
    result = subprocess.run([sys.executable, "-m", "wsi_pipeline.train", *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert f"{target}: " in output and ("has no patches" if bad == "empty" else "not a readable HDF5 file") in output
    assert "Traceback" not in output and "DataLoader worker" not in output
    assert not (tmp_path / "run" / "fold_0" / "metrics.json").exists()


def test_cli_sweep_with_submitit_local_and_a_clear_error(cohort, tmp_path):
    train = [sys.executable, "-m", "wsi_pipeline.train"]
    sweep = ["-m", *overrides(cohort, tmp_path, "abmil"), "fold=0,1", "hydra/launcher=submitit_local",
             "train.epochs=1", "train.workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(train + sweep, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert pd.read_csv(tmp_path / "summary.csv").fold.astype(str).tolist() == ["0", "1", "mean", "std"]
    no_features = overrides(cohort, tmp_path / "bad", "abmil", "demo", f"features={tmp_path}/nowhere")
    result = subprocess.run(train + no_features, capture_output=True, text=True, timeout=120, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "no features for 16 labelled slide(s)" in output
    assert "Traceback" not in output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["mamba2d", "mambamil"])
def test_a_fold_on_the_gpu_with_pinned_worker_reads(cohort, tmp_path, model):
    """On CUDA the loader pins each bag (features and the packed grid_prep) in memory as its workers hand it over,
    and the step copies it without blocking: a fold runs to its test metrics, bf16 autocast, finite predictions."""
    metrics = run_fold(compose_config(overrides(cohort, tmp_path / "run", model, "demo", "device=cuda",
                                                "train.workers=2", "train.cache=false")))
    test = pd.read_csv(tmp_path / "run" / "fold_0" / "predictions_test.csv")
    assert np.isfinite(test[["prob_0", "prob_1"]].to_numpy()).all() and 0 <= metrics["test"]["macro_auc"] <= 1
