"""Detection quality on real data (scikit-learn's packaged datasets): normal rows are flagged at the
configured rate, and corrupted rows or rows from another dataset are separated from normal ones."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold, train_test_split

from gateway.ood.profile import build_profile
from gateway.ood.scoring import OodScorer

QUANTILE = 0.95  # 5% of normal rows flagged: enough flags in a few hundred rows to measure the rate
MIN_AUROC = 0.95


@pytest.mark.parametrize("loader", [load_breast_cancer, load_digits], ids=["breast_cancer", "digits"])
def test_held_out_rows_are_flagged_at_the_configured_rate(loader: Callable[[], Any]) -> None:
    """Every row is held out once (5-fold), scored by a profile built from the other four folds.

    Tolerance: the flagged fraction varies through the held-out rows (binomial, N rows) and through each
    profile's threshold, itself a quantile estimated from ~0.8 N out-of-fold scores (the exceedance
    probability of an estimated quantile has about the same variance). So sd = sqrt(p (1-p) (1/N + 1/0.8N))
    and we allow 3.3 sd (two-sided 99.9%): [0.5%, 9.5%] for breast cancer (569 rows), [2.5%, 7.5%] for
    digits (1797 rows).
    """
    rows = loader().data
    flagged = 0
    for train, held_out in KFold(5, shuffle=True, random_state=0).split(rows):
        scorer = OodScorer(build_profile(rows[train], threshold_quantile=QUANTILE))
        flagged += int(scorer.score(rows[held_out]).flagged.sum())
    n = len(rows)
    p = 1 - QUANTILE
    tolerance = 3.3 * math.sqrt(p * (1 - p) * (1 / n + 1 / (0.8 * n)))
    assert abs(flagged / n - p) <= tolerance, f"{flagged}/{n} flagged, expected {p:.1%} ± {tolerance:.1%}"


def _shift_three_features(rows: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
    """+3 training std on 3 features chosen at random per row: each value alone is still plausible."""
    rng = np.random.default_rng(seed)
    shifted = rows.copy()
    for row in shifted:
        features = rng.choice(rows.shape[1], 3, replace=False)
        row[features] += 3 * std[features]
    return shifted


def _other_dataset(n_features: int, n_rows: int, train: np.ndarray, seed: int) -> np.ndarray:
    """Digits' highest-variance pixels, standardised and moment-matched to the training features: every
    feature has the training mean and std, so only the joint structure gives these rows away (raw digits
    pixels would be caught by their range alone)."""
    digits = load_digits().data
    pixels = digits[:, np.argsort(-digits.std(axis=0))[:n_features]]
    chosen = pixels[np.random.default_rng(seed).choice(len(pixels), n_rows, replace=False)]
    z = (chosen - pixels.mean(axis=0)) / pixels.std(axis=0)
    return z * train.std(axis=0) + train.mean(axis=0)


def _auroc(normal: np.ndarray, odd: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(odd))]
    return float(roc_auc_score(labels, np.r_[normal, odd]))


@pytest.mark.parametrize("loader", [load_breast_cancer, load_wine], ids=["breast_cancer", "wine"])
def test_corrupted_rows_are_separated_from_held_out_rows(loader: Callable[[], Any]) -> None:
    rows = loader().data
    train, held_out = train_test_split(rows, test_size=0.3, random_state=0)
    profile = build_profile(train, threshold_quantile=QUANTILE)
    scorer = OodScorer(profile)
    normal = scorer.score(held_out).scores
    for case, odd in (
        ("3 features +3 std", _shift_three_features(held_out, profile.std, seed=1)),
        ("scaled x3", held_out * 3),
    ):
        auroc = _auroc(normal, scorer.score(odd).scores)
        assert auroc >= MIN_AUROC, f"{case}: AUROC {auroc:.3f}"
        assert scorer.score(odd).flagged.mean() > 0.9, case


def test_rows_from_another_dataset_are_separated() -> None:
    rows = load_breast_cancer().data
    train, held_out = train_test_split(rows, test_size=0.3, random_state=0)
    scorer = OodScorer(build_profile(train, threshold_quantile=QUANTILE))
    other = _other_dataset(rows.shape[1], len(held_out), train, seed=2)
    auroc = _auroc(scorer.score(held_out).scores, scorer.score(other).scores)
    assert auroc >= MIN_AUROC, f"AUROC {auroc:.3f}"


def test_the_shifted_features_are_the_ones_named() -> None:
    rows = load_breast_cancer().data
    train, held_out = train_test_split(rows, test_size=0.3, random_state=0)
    profile = build_profile(train)
    shifted = held_out[:20].copy()
    # Mean radius, texture and smoothness: the z-scores name them whatever their correlations with the rest.
    features = [0, 1, 4]
    shifted[:, features] += 6 * profile.std[features]
    result = OodScorer(profile).score(shifted)
    named = {int(i) for i in result.top_index[:, :3].ravel()}
    assert result.flagged.all()
    assert features[0] in named and features[1] in named and features[2] in named
    assert np.mean([set(r) == set(features) for r in result.top_index.tolist()]) > 0.8
