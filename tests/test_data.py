"""Labels, splits and feature bags: the file conventions and every bad input, each with a clear message."""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from wsi_pipeline.data import (DataError, FeatureBags, Task, attach_features, bin_of, read_labels, read_split,
                               survival_bins)
from wsi_pipeline.feature_grids import write_cohort
from wsi_pipeline.h5io import FeatureGrid, read_features, write_features
from wsi_pipeline.models import create_model
from wsi_pipeline.models.blocks import build_lattice
from wsi_pipeline.splits import make_splits
from wsi_pipeline.train import _as_is


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), n_cases=12)


def task_for(cohort, **changes) -> Task:
    values = dict(name="t", type="classification", labels_csv=str(cohort.labels), splits_dir=str(cohort.splits),
                  label_map={"benign": 0, "tumour": 1}, metrics=["accuracy"], monitor="accuracy")
    return Task(**{**values, **changes})


def test_labels_are_mapped_and_bags_carry_their_grid(cohort):
    task = task_for(cohort)
    labels = attach_features(read_labels(task), cohort.features)
    assert sorted(labels.label.unique()) == [0, 1] and len(labels) == 12
    bag = FeatureBags(labels, task)[3]
    stored = read_features(labels.path[3])
    assert bag.slide_id == labels.slide_id[3] and bag.target["label"].item() == labels.label[3]
    assert np.array_equal(bag.grid.numpy(), stored.grid) and bag.features.shape == stored.features.shape


@pytest.mark.parametrize("cache", [False, True])
def test_bags_carry_the_models_grid_prep_through_worker_processes(cohort, cache):
    """A model's `grid_prep` runs as a bag is read (in DataLoader workers: pickled there, its lattice pickled back),
    also on a bag cached before `prepare` was set."""
    task = task_for(cohort)
    labels = attach_features(read_labels(task), cohort.features)
    model = create_model("mamba2d", in_dim=read_features(labels.path[0]).features.shape[1], n_classes=2)
    bags = FeatureBags(labels, task, cache=cache)
    assert bags[0].prepared is None
    bags.prepare = model.grid_prep
    assert bags[0].prepared is not None
    loader = DataLoader(bags, batch_size=None, num_workers=2, collate_fn=_as_is)
    for i, bag in enumerate(loader):
        expected = build_lattice(torch.from_numpy(read_features(labels.path[i]).grid.astype(np.int64)), 160_000)
        assert (bag.prepared.height, bag.prepared.width) == (expected.height, expected.width)
        assert torch.equal(bag.prepared.cell, expected.cell)
        assert torch.equal(bag.prepared.score_bias, expected.score_bias)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_slide_without_patches_is_a_clear_error(cohort, tmp_path, workers):
    """A feature file with no rows ends in one DataError naming it, also from a DataLoader worker (before, the model's
    lattice raised a bare ValueError there)."""
    task = task_for(cohort)
    labels = attach_features(read_labels(task), cohort.features)
    stored = read_features(labels.path[0])
    empty = tmp_path / "empty.h5"
    write_features(empty, FeatureGrid(stored.coords[:0], stored.grid[:0], stored.attrs, features=stored.features[:0]))
    labels.loc[0, "path"] = str(empty)
    model = create_model("mamba2d", in_dim=stored.features.shape[1], n_classes=2)
    bags = FeatureBags(labels.iloc[:2], task, prepare=model.grid_prep)
    with pytest.raises(DataError, match=r"empty\.h5: slide .* has no patches"):
        list(DataLoader(bags, batch_size=None, num_workers=workers, collate_fn=_as_is))


def test_unknown_labels_are_listed(cohort, tmp_path):
    task = task_for(cohort, label_map={"benign": 0})
    with pytest.raises(DataError, match=r"unknown label\(s\) tumour.*label_map"):
        read_labels(task)


def test_task_yaml_with_an_unknown_key_is_named(cohort):
    with pytest.raises(DataError, match=r"unknown key\(s\) \['labels_file'\]"):
        Task.from_config({"name": "t", "labels_file": "x.csv"})


def test_missing_columns_and_missing_file(cohort, tmp_path):
    no_label = tmp_path / "no_label.csv"
    pd.read_csv(cohort.labels).drop(columns="label").to_csv(no_label, index=False)
    with pytest.raises(DataError, match=r"no_label.csv: missing column\(s\) \['label'\]"):
        read_labels(task_for(cohort, labels_csv=str(no_label)))
    with pytest.raises(DataError, match="not found"):
        read_labels(task_for(cohort, labels_csv=str(tmp_path / "none.csv")))


def test_slides_without_features_error_or_skip(cohort, tmp_path, caplog):
    labels = read_labels(task_for(cohort))
    extra = pd.concat([labels, pd.DataFrame([dict(case_id="case_x", slide_id="ghost_1", label=0),
                                             dict(case_id="case_y", slide_id="ghost_2", label=1)])])
    with pytest.raises(DataError, match=r"no features for 2 labelled slide\(s\): ghost_1, ghost_2.*missing=skip"):
        attach_features(extra, cohort.features)
    with caplog.at_level(logging.WARNING):
        kept = attach_features(extra, cohort.features, missing="skip")
    assert len(kept) == 12 and "skipping 2 labelled slide(s)" in caplog.text


def test_split_naming_unknown_or_repeated_cases(cohort, tmp_path):
    labels = attach_features(read_labels(task_for(cohort)), cohort.features)
    pd.DataFrame({"train": ["case_00", "case_99"], "val": ["case_01", None], "test": ["case_02", None]}).to_csv(
        tmp_path / "splits_0.csv")
    with pytest.raises(DataError, match="splits_0.csv: case id.*case_99"):
        read_split(task_for(cohort, splits_dir=str(tmp_path)), 0, labels)
    pd.DataFrame({"train": ["case_00"], "val": ["case_00"], "test": ["case_02"]}).to_csv(tmp_path / "splits_1.csv")
    with pytest.raises(DataError, match="both train and val: case_00"):
        read_split(task_for(cohort, splits_dir=str(tmp_path)), 1, labels)
    with pytest.raises(DataError, match="wsi_pipeline.splits"):
        read_split(task_for(cohort, splits_dir=str(tmp_path)), 7, labels)


def test_missing_skip_leaves_out_cases_without_features_and_an_empty_split_is_named(cohort, tmp_path, caplog):
    """missing=skip drops slides before the split is read: a case whose every slide is gone is still a known case
    (the split was made from the same labels CSV), left out with a warning, not 'unknown'. A split column left
    with no slide (empty in the file, or emptied by the skip) is an error naming the file and the column."""
    task = task_for(cohort)
    labels = read_labels(task)
    split = pd.read_csv(cohort.splits / "splits_0.csv", dtype=str)
    gone = split["test"].dropna().iloc[0]
    available = labels[labels.case_id != gone]
    with caplog.at_level(logging.WARNING):
        splits = read_split(task, 0, labels, available)
    assert f"1 test case(s) have no slide with features and are left out: {gone}" in caplog.text
    assert gone not in set(splits["test"].case_id) and len(splits["test"]) == split["test"].notna().sum() - 1
    assert all(len(f) for f in splits.values())
    val_only = split["val"].dropna()
    with pytest.raises(DataError, match=r"splits_0.csv: the val split has no slides with features"):
        read_split(task, 0, labels, labels[~labels.case_id.isin(val_only)])
    emptied = split.assign(val=None)
    emptied.to_csv(tmp_path / "splits_0.csv", index=False)
    with pytest.raises(DataError, match=r"splits_0.csv: the val split has no slides; every fold needs"):
        read_split(task_for(cohort, splits_dir=str(tmp_path)), 0, labels)


def test_task_checks_its_metrics_and_label_indices_when_read(cohort):
    with pytest.raises(DataError, match=r"unknown metric\(s\) \['c_index'\] for a classification task"):
        task_for(cohort, metrics=["accuracy", "c_index"])
    with pytest.raises(DataError, match=r"unknown metric\(s\) \['auc'\]"):
        task_for(cohort, metrics=["accuracy", "auc"])
    with pytest.raises(DataError, match=r"label_map indices must be 0 ... C-1.*\[1, 2\]"):
        task_for(cohort, label_map={"benign": 1, "tumour": 2})
    assert task_for(cohort, label_map={"benign": 0, "tumour": 1, "other": 1}).n_outputs == 2


def test_splits_are_patient_level_stratified_and_cover_every_case_once():
    rng = np.random.default_rng(0)
    labels = pd.DataFrame([dict(case_id=f"c{i:02d}", slide_id=f"c{i:02d}_{s}", label=i % 3)
                           for i in range(30) for s in range(1 + rng.integers(0, 3))])
    tables = make_splits(labels, k=5, val_fraction=0.2)
    tested = []
    for table in tables:
        cols = {c: set(table[c].dropna()) for c in ("train", "val", "test")}
        assert not (cols["train"] & cols["val"] or cols["train"] & cols["test"] or cols["val"] & cols["test"])
        assert set().union(*cols.values()) == set(labels.case_id)
        strata = labels.groupby("case_id").label.first()
        assert sorted(strata[list(cols["test"])].value_counts().tolist()) == [2, 2, 2]
        tested += cols["test"]
    assert sorted(tested) == sorted(set(labels.case_id))
    with pytest.raises(DataError, match="k=1: k-fold splits need k >= 2"):
        make_splits(labels, k=1)


def test_splits_cli_writes_clam_files(cohort, tmp_path):
    result = subprocess.run([sys.executable, "-m", "wsi_pipeline.splits", f"labels={cohort.labels}", "k=3",
                             f"out={tmp_path}/splits"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "splits" / "splits_2.csv", index_col=0)
    assert list(table.columns) == ["train", "val", "test"] and table.test.notna().sum() == 4


def test_survival_bins_come_from_uncensored_training_times():
    train = pd.DataFrame({"survival_months": [1, 2, 3, 4, 5, 100.0], "censorship": [0, 0, 0, 0, 0, 1]})
    edges = survival_bins(train, 2)
    assert edges[0] == -np.inf and edges[-1] == np.inf and edges[1] == 3.0
    assert bin_of(np.array([0.5, 3.0, 100.0]), edges).tolist() == [0, 1, 1]
    with pytest.raises(DataError, match="uncensored"):
        survival_bins(train, 8)
