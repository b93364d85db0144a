"""The native OOD kernel (`native/ood.pyx`) equals its numpy reference (`reference_scores`): scores to
~1e-9 relative, the same top-k features in the same order, +inf for non-finite rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from gateway.ood.profile import Profile, build_profile
from gateway.ood.scoring import OodScorer, reference_scores
from native.ood import Kernel


def _profile(n_features: int, seed: int) -> Profile:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((n_features, n_features)) * rng.uniform(0.1, 10, n_features)
    return build_profile(
        rng.standard_normal((max(4 * n_features, 50), n_features)) @ mixing + rng.normal(0, 5, n_features)
    )


@pytest.mark.parametrize(
    ("n_features", "n_rows", "top_k"), [(1, 5, 3), (4, 1, 3), (13, 17, 1), (32, 64, 3), (100, 9, 5)]
)
def test_native_equals_reference(n_features: int, n_rows: int, top_k: int) -> None:
    profile = _profile(n_features, seed=n_features)
    rng = np.random.default_rng(1)
    rows = profile.mean + rng.standard_normal((n_rows, n_features)) * profile.std * rng.uniform(0.5, 4, (n_rows, 1))
    native = OodScorer(profile, top_k).score(rows)
    reference = reference_scores(rows, profile, top_k)
    np.testing.assert_allclose(native.scores, reference.scores, rtol=1e-9)
    np.testing.assert_array_equal(native.top_index, reference.top_index)
    np.testing.assert_allclose(native.top_z, reference.top_z, rtol=1e-12)
    assert native.max_score == pytest.approx(reference.max_score, rel=1e-9)
    np.testing.assert_array_equal(native.flagged, reference.flagged)
    assert native.top_index.shape == (n_rows, min(top_k, n_features))


def test_top_k_is_ordered_by_magnitude_with_ties_by_index() -> None:
    # Unit scale around zero, so the float32 rows are exactly these z-scores and the ties are exact.
    profile = replace(_profile(6, seed=0), mean=np.zeros(6), scale=np.ones(6), inverse_covariance=np.eye(6))
    rows = np.array([[1.0, -3.0, 3.0, 0.5, -2.0, 3.0]])
    native = OodScorer(profile, top_k=4).score(rows)
    np.testing.assert_array_equal(native.top_index, [[1, 2, 5, 4]])
    np.testing.assert_array_equal(native.top_z, [[-3.0, 3.0, 3.0, -2.0]])
    np.testing.assert_array_equal(reference_scores(rows, profile, top_k=4).top_index, native.top_index)


def test_non_finite_values_score_infinity_and_rank_first() -> None:
    profile = _profile(8, seed=2)
    rows = np.tile(profile.mean, (4, 1))
    rows[0, 5] = np.nan
    rows[1, 2] = np.inf
    rows[2, 7] = -np.inf
    native = OodScorer(profile).score(rows)
    reference = reference_scores(rows, profile)
    assert np.isposinf(native.scores[:3]).all() and native.scores[3] == pytest.approx(0.0, abs=1e-6)
    # Row 3 sits on the mean: its score is rounding noise, equal to ~1e-9 (not to the last bit, which
    # depends on numpy's summation order), and the order of its near-zero z-scores means nothing.
    np.testing.assert_allclose(native.scores, reference.scores, rtol=1e-9)
    np.testing.assert_array_equal(native.top_index[:3, 0], [5, 2, 7])
    np.testing.assert_array_equal(native.top_index[:3], reference.top_index[:3])
    assert native.flagged.tolist() == [True, True, True, False]
    assert native.max_score == np.inf and native.any_flagged


def test_extreme_finite_values_match_the_reference() -> None:
    profile = _profile(3, seed=3)
    rows = np.array([[3e38, 0.0, 0.0]], dtype=np.float32)
    native = OodScorer(profile).score(rows)
    np.testing.assert_allclose(native.scores, reference_scores(rows, profile).scores, rtol=1e-9)
    assert native.any_flagged


def test_any_dtype_is_converted_once_and_wrong_width_is_refused() -> None:
    profile = _profile(5, seed=4)
    rows64 = profile.mean + np.random.default_rng(0).standard_normal((3, 5)) * profile.std
    scorer = OodScorer(profile)
    np.testing.assert_array_equal(scorer.score(rows64).scores, scorer.score(rows64.astype(np.float32)).scores)
    np.testing.assert_array_equal(scorer.score(rows64.T.copy().T).scores, scorer.score(rows64).scores)  # Fortran order
    with pytest.raises(ValueError, match="rows have 4 features but the OOD profile has 5"):
        scorer.score(rows64[:, :4])
    with pytest.raises(ValueError, match=r"needs rows x features, got shape \(5,\)"):
        scorer.score(rows64[0])
    assert scorer.score(np.empty((0, 5))).max_score == 0.0


def test_kernel_checks_its_outputs() -> None:
    kernel = Kernel(np.zeros(3), np.eye(3), np.ones(3), 2)
    rows = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="outputs hold fewer than 4 rows"):
        kernel.score(rows, np.empty(3), np.empty((4, 2), np.intp), np.empty((4, 2)))
    with pytest.raises(ValueError, match="must have 2 columns"):
        kernel.score(rows, np.empty(4), np.empty((4, 3), np.intp), np.empty((4, 3)))
    with pytest.raises(ValueError, match="top_k 4 is not in"):
        Kernel(np.zeros(3), np.eye(3), np.ones(3), 4)


def test_result_explains_the_flagged_rows() -> None:
    profile = _profile(12, seed=5)
    names = profile.feature_names
    rows = np.tile(profile.mean, (3, 1))
    rows[1, 3] += 40 * profile.scale[3]
    rows[2, 10] -= 25 * profile.scale[10]
    rows[2, 3] += 10 * profile.scale[3]
    result = OodScorer(profile, top_k=2).score(rows)
    assert result.flagged.tolist() == [False, True, True]
    worst = result.worst_features()
    assert [name for name, _ in worst] == [names[3], names[10]]  # x3 once, with its most extreme z (+40)
    assert worst[0][1] == pytest.approx(40, rel=1e-4) and worst[1][1] == pytest.approx(-25, rel=1e-4)
    assert result.features_text() == f"{names[3]}=+40.0,{names[10]}=-25.0"
    calm = OodScorer(profile).score(rows[:1])
    assert not calm.any_flagged and len(calm.worst_features()) == 3  # the worst (here: only) row
