"""The gateway's numpy quality figures against scikit-learn's, with weights, ties and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.feedback.metrics import Rate, auroc, classification, regression

skm = pytest.importorskip("sklearn.metrics")


def test_weighted_classification_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(7)
    n = 2000
    truth = rng.integers(0, 2, n)
    p1 = np.clip(truth * 0.35 + rng.random(n) * 0.65, 0, 1).round(2).astype(np.float32)  # rounded: many ties
    probabilities = np.stack([1 - p1, p1], axis=1)
    predicted = (p1 >= 0.5).astype(np.int64)
    weight = rng.uniform(0.2, 3.0, n)
    got, bins = classification(truth, predicted, weight, 1, probabilities)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(truth, predicted, sample_weight=weight))
    assert got["precision"] == pytest.approx(skm.precision_score(truth, predicted, sample_weight=weight))
    assert got["recall"] == pytest.approx(skm.recall_score(truth, predicted, sample_weight=weight))
    tn, fp, fn, tp = skm.confusion_matrix(truth, predicted, sample_weight=weight).ravel()
    assert got["fpr"] == pytest.approx(fp / (fp + tn))
    assert got["log_loss"] == pytest.approx(skm.log_loss(truth, probabilities, sample_weight=weight), rel=1e-6)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(truth, p1, sample_weight=weight), rel=1e-9)
    assert sum(b.n for b in bins) == n and 0 <= got["ece"] <= 1


def test_auroc_of_one_class_is_undefined_and_regression_matches_sklearn() -> None:
    assert math.isnan(auroc(np.array([True, True]), np.array([0.2, 0.9]), np.ones(2)))
    rng = np.random.default_rng(3)
    truth, predicted, weight = rng.normal(size=500), rng.normal(size=500), rng.uniform(0, 2, 500)
    got = regression(truth, predicted, weight)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(truth, predicted, sample_weight=weight))
    assert got["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(truth, predicted, sample_weight=weight)))


def test_wilson_interval() -> None:
    rate = Rate.wilson(40, 50)  # textbook value: 0.8 [0.670, 0.888]
    assert (round(rate.low, 3), round(rate.high, 3)) == (0.67, 0.888)
    assert Rate.wilson(0, 10).low == 0.0 and Rate.wilson(10, 10).high == 1.0
    assert math.isnan(Rate.wilson(0, 0).value)
