"""Metrics (scikit-learn / scikit-survival through the registry) and the training losses."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from wsi_pipeline.losses import cross_entropy, nll_survival
from wsi_pipeline.metrics import compute_metrics, list_metrics


def classification_table(labels, probs) -> pd.DataFrame:
    frame = pd.DataFrame({"label": labels, "pred": [max(range(len(p)), key=p.__getitem__) for p in probs]})
    for c in range(len(probs[0])):
        frame[f"prob_{c}"] = [p[c] for p in probs]
    return frame


def test_classification_metrics_on_a_hand_checked_table():
    table = classification_table([0, 0, 1, 1, 2, 2], [[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1],
                                                       [.1, .2, .7], [.5, .1, .4]])
    m = compute_metrics(["accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "qwk"], table)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    # per-class F1: class 0 (tp 1, fp 1, fn 1) .5; class 1 (tp 2, fp 1) .8; class 2 (tp 1, fn 1) 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # one-vs-rest AUCs: class 0 ranks 7 of its 8 (positive, negative) pairs right, classes 1 and 2 all of theirs
    assert m["macro_auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)
    # preds [0, 1, 1, 1, 2, 0]; weights (i - j)^2 / 4: observed .25 + 1, expected (3.5 + 1.5 + 5.5) / 6 -> 1 - 1.25 / 1.75
    assert m["qwk"] == pytest.approx(2 / 7)
    perfect = classification_table([0, 1, 2], [[.9, .05, .05], [.05, .9, .05], [.05, .05, .9]])
    assert compute_metrics(["qwk", "macro_auc"], perfect) == {"qwk": 1.0, "macro_auc": 1.0}


def test_binary_auc_uses_the_positive_class_probability():
    table = classification_table([0, 0, 1, 1], [[.9, .1], [.4, .6], [.6, .4], [.2, .8]])
    assert compute_metrics(["macro_auc"], table)["macro_auc"] == pytest.approx(0.75)
    assert math.isnan(compute_metrics(["macro_auc"], table[table.label == 0])["macro_auc"])


def test_c_index_follows_risk_order_and_ignores_censored_pairs():
    table = pd.DataFrame({"survival_months": [5, 10, 20, 30], "censorship": [0, 0, 1, 0],
                          "risk": [4.0, 3.0, 2.0, 1.0]})
    assert compute_metrics(["c_index"], table)["c_index"] == 1.0
    assert compute_metrics(["c_index"], table.assign(risk=-table.risk))["c_index"] == 0.0


def test_unknown_metric_is_named():
    assert {"accuracy", "c_index", "qwk"} <= set(list_metrics())
    assert "c_index" in list_metrics("survival") and "c_index" not in list_metrics("classification")
    with pytest.raises(KeyError, match="nope"):
        compute_metrics(["nope"], pd.DataFrame())


def test_nll_survival_matches_the_discrete_hazard_likelihood():
    logits = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.0, 0.0]])
    h = torch.sigmoid(logits)
    s = torch.cumprod(1 - h, dim=1)
    # case 0: event in bin 1 -> -log S(0) - log h(1); case 1: censored in bin 2 -> -log S(2)
    expected = torch.stack([-torch.log(s[0, 0]) - torch.log(h[0, 1]), -torch.log(s[1, 2])])
    loss = nll_survival(logits, torch.tensor([1, 2]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    only_events = nll_survival(logits, torch.tensor([1, 2]), torch.tensor([0.0, 1.0]), alpha=1.0)
    assert only_events.item() == pytest.approx(expected[0].item() / 2, rel=1e-5)


def test_cross_entropy():
    assert cross_entropy(torch.zeros(1, 4), torch.tensor([2])).item() == pytest.approx(math.log(4))


def test_c_index_is_nan_without_comparable_pairs():
    # one event, at the shortest time, but it is the only case: nothing to compare (a tiny validation split)
    table = pd.DataFrame({"survival_months": [5.0, 9.0], "censorship": [1, 1], "risk": [0.2, 0.1]})
    assert math.isnan(compute_metrics(["c_index"], table)["c_index"])
    table = pd.DataFrame({"survival_months": [5.0, 3.0], "censorship": [0, 1], "risk": [0.2, 0.1]})
    assert math.isnan(compute_metrics(["c_index"], table)["c_index"])  # the censored case left before the event
