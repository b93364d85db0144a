"""The OOD profile: what it computes, its file round trip, the defects `load_profile` must name, and
the training-data formats the CLI reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.covariance import ledoit_wolf
from sklearn.datasets import load_breast_cancer

from gateway.errors import ConfigError
from gateway.ood.profile import (
    KS_POINTS,
    N_BINS,
    PROFILE_FILE,
    SCORE_POINTS,
    build_profile,
    load_profile,
    load_training_data,
    save_profile,
)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return load_breast_cancer().data


def test_profile_summarises_the_training_rows(rows: np.ndarray) -> None:
    profile = build_profile(rows, threshold_quantile=0.99)
    assert profile.n_features == 30 and profile.n_rows == len(rows)
    assert profile.feature_names[:2] == ("x0", "x1")
    np.testing.assert_allclose(profile.mean, rows.mean(axis=0))
    np.testing.assert_allclose(profile.std, rows.std(axis=0))
    np.testing.assert_array_equal(profile.minimum, rows.min(axis=0))
    np.testing.assert_array_equal(profile.maximum, rows.max(axis=0))
    assert profile.bin_edges.shape == (30, N_BINS + 1) and profile.ks_grid.shape == (30, KS_POINTS)
    np.testing.assert_allclose(profile.bin_fractions.sum(axis=1), 1.0)
    np.testing.assert_allclose(profile.ks_cdf[:, -1], 1.0)
    # Continuous features: the decile bins hold about a tenth of the rows each.
    assert np.abs(profile.bin_fractions[0] - 0.1).max() < 0.01
    np.testing.assert_allclose(profile.inverse_covariance @ profile.covariance, np.eye(30), atol=1e-8)
    assert profile.score_quantiles.shape == (SCORE_POINTS,)
    assert np.all(np.diff(profile.score_quantiles) >= 0)
    assert profile.score_quantiles[0] < profile.threshold < profile.score_quantiles[-1]
    assert profile.threshold_quantile == 0.99


def test_covariance_is_ledoit_wolf_on_the_correlation_matrix(rows: np.ndarray) -> None:
    profile = build_profile(rows)
    z = (rows - rows.mean(axis=0)) / rows.std(axis=0)
    shrunk, shrinkage = ledoit_wolf(z)
    assert profile.shrinkage == pytest.approx(shrinkage, rel=1e-9)
    np.testing.assert_allclose(profile.covariance, shrunk * np.outer(profile.std, profile.std), rtol=1e-9)


def test_a_higher_quantile_gives_a_higher_threshold(rows: np.ndarray) -> None:
    assert build_profile(rows, 0.9).threshold < build_profile(rows, 0.99).threshold


def test_a_constant_feature_needs_no_division_by_zero() -> None:
    data = np.random.default_rng(0).standard_normal((200, 4))
    data[:, 2] = 5.0
    with np.errstate(all="raise"):
        profile = build_profile(data)
    assert profile.std[2] == 0.0 and profile.scale[2] > 0
    assert np.all(np.isfinite(profile.inverse_covariance))
    # The constant feature is uncorrelated with the rest: it adds only its own z^2 to a distance.
    assert np.all(profile.covariance[2, [0, 1, 3]] == 0)


def test_too_few_or_non_finite_rows_are_refused() -> None:
    data = np.random.default_rng(0).standard_normal((100, 10))
    with pytest.raises(ValueError, match="11 training rows for 10 features: need at least 12"):
        build_profile(data[:11])
    build_profile(data[:12])
    data[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 training rows contain NaN or infinity \(first: row 7\)"):
        build_profile(data)
    with pytest.raises(ValueError, match="threshold_quantile 1.5"):
        build_profile(data[:5, :2], threshold_quantile=1.5)


def test_round_trip_keeps_every_field(tmp_path: Path, rows: np.ndarray) -> None:
    names = tuple(load_breast_cancer().feature_names)
    profile = build_profile(rows, 0.95, feature_names=names)
    path = tmp_path / PROFILE_FILE
    save_profile(profile, path)
    loaded = load_profile(path, expected_features=30)
    assert loaded.feature_names == names
    for field in ("mean", "std", "scale", "bin_edges", "ks_cdf", "covariance", "inverse_covariance", "score_quantiles"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(profile, field), err_msg=field)
    assert (loaded.threshold, loaded.threshold_quantile, loaded.n_rows) == (profile.threshold, 0.95, len(rows))
    assert not loaded.mean.flags.writeable
    with np.load(path, allow_pickle=False) as npz:  # no pickled objects in the file
        assert int(npz["format_version"]) == 1


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / PROFILE_FILE
    save_profile(build_profile(np.random.default_rng(0).standard_normal((100, 5))), path)
    return path


def _rewrite(path: Path, **changes: np.ndarray | None) -> None:
    with np.load(path, allow_pickle=False) as npz:
        data = {key: npz[key] for key in npz.files}
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    with open(path, "wb") as f:
        np.savez(f, **data)


def test_wrong_feature_count_names_the_file(saved: Path) -> None:
    with pytest.raises(ConfigError, match=f"{saved} has 5 features but the model's input has 32"):
        load_profile(saved, expected_features=32)


def test_missing_key_names_the_file_and_key(saved: Path) -> None:
    _rewrite(saved, inverse_covariance=None)
    with pytest.raises(ConfigError, match=f"{saved} has no 'inverse_covariance' entry"):
        load_profile(saved)


def test_wrong_shape_names_the_file_and_array(saved: Path) -> None:
    _rewrite(saved, covariance=np.eye(4))
    with pytest.raises(ConfigError, match=rf"{saved} is invalid: covariance has shape \(4, 4\), expected \(5, 5\)"):
        load_profile(saved)


def test_non_finite_statistics_are_refused(saved: Path) -> None:
    mean = np.zeros(5)
    mean[2] = np.nan
    _rewrite(saved, mean=mean)
    with pytest.raises(ConfigError, match=f"{saved} is invalid: mean has NaN or infinite values"):
        load_profile(saved)


def _inverse_of(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        return np.array(npz["inverse_covariance"])


@pytest.mark.parametrize(
    ("damage", "refusal"),
    [
        ("negated", "inverse_covariance is not positive definite"),  # scored a row 50 std out as 0
        ("asymmetric", "inverse_covariance is not symmetric"),  # native and reference scores disagreed
        ("shrinkage", r"shrinkage -7.0 is not in \[0.0001, 1\]"),
        ("n_rows", "n_rows -5 is not a count of training rows"),
    ],
)
def test_a_profile_that_would_score_nonsense_is_refused(saved: Path, damage: str, refusal: str) -> None:
    inverse = _inverse_of(saved)
    if damage == "negated":
        _rewrite(saved, inverse_covariance=-inverse)
    elif damage == "asymmetric":
        inverse[0, 1] += 5
        _rewrite(saved, inverse_covariance=inverse)
    else:
        _rewrite(saved, **{damage: np.array(-7.0 if damage == "shrinkage" else -5)})
    with pytest.raises(ConfigError, match=f"{saved} is invalid: {refusal}"):
        load_profile(saved)


def test_features_on_scales_far_apart_still_load(tmp_path: Path) -> None:
    rows = np.random.default_rng(5).standard_normal((400, 3)) * np.array([1e-6, 1.0, 1e6])
    save_profile(build_profile(rows), tmp_path / "profile.npz")
    assert load_profile(tmp_path / "profile.npz").n_rows == 400


def test_unknown_format_version_is_refused(saved: Path) -> None:
    _rewrite(saved, format_version=np.array(2))
    with pytest.raises(ConfigError, match="format_version 2 is not supported"):
        load_profile(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "npy"])
def test_corrupt_file_names_the_file(saved: Path, damage: str) -> None:
    if damage == "truncated":
        saved.write_bytes(saved.read_bytes()[:200])
    elif damage == "garbage":
        saved.write_bytes(b"not a profile at all" * 10)
    else:
        with open(saved, "wb") as f:
            np.save(f, np.zeros(3))
    with pytest.raises(ConfigError, match=f"OOD profile {saved} is not a readable profile file"):
        load_profile(saved)


def test_pickled_content_is_not_loaded(saved: Path) -> None:
    _rewrite(saved, feature_names=np.array([f"x{i}" for i in range(5)], dtype=object))
    with pytest.raises(ConfigError, match=f"OOD profile {saved} is not a readable profile file"):
        load_profile(saved)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path / 'absent.npz'}: no such file"):
        load_profile(tmp_path / "absent.npz")


def test_training_data_formats_agree(tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((50, 3))
    np.save(tmp_path / "rows.npy", data)
    np.savetxt(tmp_path / "plain.csv", data, delimiter=",", fmt="%.17g")
    np.savetxt(tmp_path / "header.csv", data, delimiter=",", fmt="%.17g", header="age,income,score", comments="")
    pq.write_table(pa.table({"age": data[:, 0], "income": data[:, 1], "score": data[:, 2]}), tmp_path / "rows.parquet")
    for name, names in (
        ("rows.npy", None),
        ("plain.csv", None),
        ("header.csv", ("age", "income", "score")),
        ("rows.parquet", ("age", "income", "score")),
    ):
        loaded = load_training_data(tmp_path / name)
        np.testing.assert_array_equal(loaded.rows, data, err_msg=name)
        assert loaded.feature_names == names, name


def test_unreadable_training_data_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(ValueError, match="cannot read training data .*bad.csv"):
        load_training_data(tmp_path / "bad.csv")
    (tmp_path / "rows.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"rows.txt: unknown format \(use .npy, .csv or .parquet\)"):
        load_training_data(tmp_path / "rows.txt")
    np.save(tmp_path / "flat.npy", np.zeros(4))
    with pytest.raises(ValueError, match=r"must be 2-D \(rows x features\), got shape \(4,\)"):
        load_training_data(tmp_path / "flat.npy")
