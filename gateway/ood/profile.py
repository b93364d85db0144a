"""A model version's training-data profile: what "in distribution" means for its inputs.

Built once, offline, from training rows (`build_profile`), stored as `profile.npz` beside the version's
`model.onnx`, and loaded by the gateway at startup (`load_profile`). It holds what the request path and
the drift monitor need and nothing else: per-feature moments and ranges, quantile bins (PSI),
a percentile grid (KS), a regularised covariance and its inverse (Mahalanobis distance), and the
distribution of training scores with the threshold taken from it.

Covariance: Ledoit-Wolf shrinkage of the correlation matrix towards the identity (the shrinkage
intensity is estimated from the data), rescaled by the per-feature standard deviations. Shrinking the
correlation rather than the covariance keeps the regularisation independent of the features' units.
A feature that is constant in training (std at most `CONSTANT_SCALE` relative to its mean) gets that
floor as its scale and no correlation with the others: any change to it scores as a large deviation,
without a division by zero.

Threshold: the training rows' own distances are optimistic (the covariance was fitted to them), so
the scores whose quantile sets the threshold are out-of-fold: each row is scored by a profile fitted
on the other folds. New rows from the training distribution are then flagged at about
`1 - threshold_quantile`.
"""

from __future__ import annotations

import csv
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from gateway.errors import ConfigError

PROFILE_FILE = "profile.npz"
FORMAT_VERSION = 1
N_BINS = 10  # PSI bins: training deciles
KS_POINTS = 101  # KS grid: training percentiles 0, 1, ..., 100
SCORE_POINTS = 101  # stored quantiles of the training scores
FOLDS = 5  # out-of-fold scoring for the threshold
CONSTANT_SCALE = 1e-6  # relative std below which a feature counts as constant (float32 rounding is ~6e-8)
MIN_SHRINKAGE = 1e-4  # keeps the correlation invertible when features are exactly collinear

Array = npt.NDArray[np.float64]

_ARRAYS_1D = ("mean", "std", "scale", "minimum", "maximum")
_ARRAYS_2D = {
    "bin_edges": N_BINS + 1,
    "bin_fractions": N_BINS,
    "ks_grid": KS_POINTS,
    "ks_cdf": KS_POINTS,
}


@dataclass(frozen=True, eq=False)
class Profile:
    """The training data of one model version, summarised (all arrays float64, read-only)."""

    feature_names: tuple[str, ...]
    mean: Array  # (F,)
    std: Array  # (F,) population std; 0 for a constant feature
    scale: Array  # (F,) std, floored for constant features: the z-score denominator
    minimum: Array  # (F,)
    maximum: Array  # (F,)
    bin_edges: Array  # (F, N_BINS + 1) training quantiles: the PSI bins (outer bins open-ended)
    bin_fractions: Array  # (F, N_BINS) training fraction in each bin (not exactly 0.1 when values tie)
    ks_grid: Array  # (F, KS_POINTS) training percentiles
    ks_cdf: Array  # (F, KS_POINTS) training fraction <= each grid point
    covariance: Array  # (F, F) regularised (see the module docstring)
    inverse_covariance: Array  # (F, F) its inverse, C-contiguous for the native scorer
    shrinkage: float  # Ledoit-Wolf intensity used on the correlation matrix, in [MIN_SHRINKAGE, 1]
    score_quantiles: Array  # (SCORE_POINTS,) out-of-fold training scores at quantiles 0, 0.01, ..., 1
    threshold: float  # rows scoring above it are out of distribution
    threshold_quantile: float  # the quantile of the training scores the threshold is
    n_rows: int  # training rows the profile was built from

    def __post_init__(self) -> None:
        n = len(self.feature_names)
        if n < 1:
            raise ValueError("a profile needs at least one feature")
        for name in (*_ARRAYS_1D, *_ARRAYS_2D, "covariance", "inverse_covariance", "score_quantiles"):
            array = np.array(getattr(self, name), dtype=np.float64, order="C")
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        expected: dict[str, tuple[int, ...]] = {name: (n,) for name in _ARRAYS_1D}
        expected.update({name: (n, width) for name, width in _ARRAYS_2D.items()})
        expected.update(covariance=(n, n), inverse_covariance=(n, n), score_quantiles=(SCORE_POINTS,))
        for name, shape in expected.items():
            array = getattr(self, name)
            if array.shape != shape:
                raise ValueError(f"{name} has shape {array.shape}, expected {shape} for {n} features")
            if not np.isfinite(array).all():
                raise ValueError(f"{name} has NaN or infinite values")  # a NaN score would never be flagged
        if not np.all(self.scale > 0):
            raise ValueError("scale must be positive for every feature")
        if not 0.0 < self.threshold_quantile < 1.0:
            raise ValueError(f"threshold_quantile {self.threshold_quantile} is not in (0, 1)")
        if not (np.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold {self.threshold} is not a finite distance")
        # A profile whose inverse is not symmetric positive definite scores nonsense without failing: a
        # negated one scores a row 50 std out as 0 (never flagged), and the native scorer, which reads one
        # triangle, disagrees with the reference on a non-symmetric one.
        inverse = self.inverse_covariance
        if not np.allclose(inverse, inverse.T, rtol=1e-9, atol=1e-12):
            raise ValueError("inverse_covariance is not symmetric")
        try:  # on the inverse correlation: features' scales far apart would make the check itself fail
            np.linalg.cholesky(inverse * np.outer(self.scale, self.scale))
        except np.linalg.LinAlgError:
            raise ValueError("inverse_covariance is not positive definite") from None
        if not MIN_SHRINKAGE <= self.shrinkage <= 1:
            raise ValueError(f"shrinkage {self.shrinkage} is not in [{MIN_SHRINKAGE}, 1]")
        if self.n_rows < 1:
            raise ValueError(f"n_rows {self.n_rows} is not a count of training rows")

    @property
    def n_features(self) -> int:
        return len(self.feature_names)


class TrainingData(NamedTuple):
    rows: Array  # (n_rows, n_features) float64
    feature_names: tuple[str, ...] | None  # from a CSV header or Parquet columns


class _Fit(NamedTuple):
    mean: Array
    std: Array
    scale: Array
    covariance: Array
    inverse: Array
    shrinkage: float


def _ledoit_wolf(z: Array) -> tuple[Array, float]:
    """The empirical covariance of centred rows and the intensity of its shrinkage towards mu * I
    (Ledoit & Wolf 2004, computed as sklearn's `ledoit_wolf_shrinkage`)."""
    n, p = z.shape
    empirical = z.T @ z / n
    squares = z**2
    trace = squares.sum(axis=0) / n
    mu = trace.sum() / p
    beta_sum = (squares.T @ squares).sum()
    delta_sum = (empirical**2).sum()
    beta = (beta_sum / n - delta_sum) / (p * n)
    delta = (delta_sum - 2 * mu * trace.sum() + p * mu**2) / p
    beta = min(beta, delta)
    return empirical, 0.0 if beta <= 0 else float(beta / delta)


def _fit(rows: Array) -> _Fit:
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    floor = CONSTANT_SCALE * np.maximum(np.abs(mean), 1.0)
    varying = std > floor
    scale = np.where(varying, std, floor)
    n_features = rows.shape[1]
    correlation = np.eye(n_features)
    shrinkage = MIN_SHRINKAGE
    if varying.any():
        z = (rows[:, varying] - mean[varying]) / std[varying]
        empirical, estimated = _ledoit_wolf(z)
        shrinkage = min(max(estimated, MIN_SHRINKAGE), 1.0)
        block = (1 - shrinkage) * empirical
        block.flat[:: block.shape[0] + 1] += shrinkage  # the target mu * I is I: standardised features
        correlation[np.ix_(varying, varying)] = block
    inverse_correlation = np.linalg.inv(correlation)
    inverse_correlation = (inverse_correlation + inverse_correlation.T) / 2
    outer = np.outer(scale, scale)
    return _Fit(mean, std, scale, correlation * outer, inverse_correlation / outer, shrinkage)


def _distances(rows: Array, mean: Array, inverse: Array) -> Array:
    d = rows - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, inverse, d), 0.0))


def _out_of_fold_scores(rows: Array) -> Array:
    n = len(rows)
    scores = np.empty(n)
    # A fixed permutation: training files are often sorted (by time, by label), and profiles must be reproducible.
    for held in np.array_split(np.random.default_rng(0).permutation(n), min(FOLDS, n)):
        train = np.ones(n, dtype=bool)
        train[held] = False
        fit = _fit(rows[train])
        scores[held] = _distances(rows[held], fit.mean, fit.inverse)
    return scores


def _check_rows(rows: npt.ArrayLike) -> Array:
    array = np.asarray(rows, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"training rows must be 2-D (rows x features), got shape {array.shape}")
    n, p = array.shape
    if n < p + 2:
        raise ValueError(f"{n} training rows for {p} features: need at least {p + 2} (features + 2)")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{int(bad.sum())} training rows contain NaN or infinity (first: row {first})")
    return array


def build_profile(
    rows: npt.ArrayLike, threshold_quantile: float = 0.995, feature_names: tuple[str, ...] | None = None
) -> Profile:
    """Profile `rows` (n_rows x n_features training inputs); rows above the threshold are flagged as OOD."""
    data = _check_rows(rows)
    n, p = data.shape
    names = tuple(feature_names) if feature_names is not None else tuple(f"x{i}" for i in range(p))
    if len(names) != p:
        raise ValueError(f"{len(names)} feature names for {p} features")
    if not 0.0 < threshold_quantile < 1.0:
        raise ValueError(f"threshold_quantile {threshold_quantile} is not in (0, 1)")
    fit = _fit(data)
    scores = _out_of_fold_scores(data)
    ordered = np.sort(data, axis=0)
    bin_edges = np.quantile(ordered, np.linspace(0, 1, N_BINS + 1), axis=0).T
    ks_grid = np.quantile(ordered, np.linspace(0, 1, KS_POINTS), axis=0).T
    bin_fractions = np.empty((p, N_BINS))
    ks_cdf = np.empty((p, KS_POINTS))
    for f in range(p):
        bins = np.searchsorted(bin_edges[f, 1:-1], ordered[:, f], side="right")
        bin_fractions[f] = np.bincount(bins, minlength=N_BINS) / n
        ks_cdf[f] = np.searchsorted(ordered[:, f], ks_grid[f], side="right") / n
    return Profile(
        feature_names=names,
        mean=fit.mean,
        std=fit.std,
        scale=fit.scale,
        minimum=ordered[0],
        maximum=ordered[-1],
        bin_edges=bin_edges,
        bin_fractions=bin_fractions,
        ks_grid=ks_grid,
        ks_cdf=ks_cdf,
        covariance=fit.covariance,
        inverse_covariance=fit.inverse,
        shrinkage=fit.shrinkage,
        score_quantiles=np.quantile(scores, np.linspace(0, 1, SCORE_POINTS)),
        threshold=float(np.quantile(scores, threshold_quantile)),
        threshold_quantile=threshold_quantile,
        n_rows=n,
    )


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write `profile` as an .npz (no pickled objects), atomically: a gateway never reads half a file."""
    target = Path(path)
    arrays = {name: getattr(profile, name) for name in (*_ARRAYS_1D, *_ARRAYS_2D)}
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                format_version=np.int64(FORMAT_VERSION),
                feature_names=np.array(profile.feature_names, dtype=np.str_),
                covariance=profile.covariance,
                inverse_covariance=profile.inverse_covariance,
                shrinkage=np.float64(profile.shrinkage),
                score_quantiles=profile.score_quantiles,
                threshold=np.float64(profile.threshold),
                threshold_quantile=np.float64(profile.threshold_quantile),
                n_rows=np.int64(profile.n_rows),
                **arrays,
            )
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _scalar(data: dict[str, np.ndarray], key: str) -> float:
    value = data[key]
    if value.shape != ():
        raise ValueError(f"{key} has shape {value.shape}, expected a scalar")
    return float(value)


def load_profile(path: str | os.PathLike[str], expected_features: int | None = None) -> Profile:
    """Read a profile written by `save_profile`; any defect is a ConfigError naming the file."""
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with npz:
            data = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise ConfigError(f"OOD profile {path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ConfigError(f"OOD profile {path} is not a readable profile file: {e}") from e
    try:
        version = int(_scalar(data, "format_version"))
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version} is not supported (this gateway reads {FORMAT_VERSION})")
        names = data["feature_names"]
        if names.ndim != 1 or names.dtype.kind != "U":
            raise ValueError(f"feature_names must be a 1-D array of strings, got {names.dtype} {names.shape}")
        profile = Profile(
            feature_names=tuple(str(name) for name in names),
            covariance=data["covariance"],
            inverse_covariance=data["inverse_covariance"],
            shrinkage=_scalar(data, "shrinkage"),
            score_quantiles=data["score_quantiles"],
            threshold=_scalar(data, "threshold"),
            threshold_quantile=_scalar(data, "threshold_quantile"),
            n_rows=int(_scalar(data, "n_rows")),
            **{name: data[name] for name in (*_ARRAYS_1D, *_ARRAYS_2D)},
        )
    except KeyError as e:
        raise ConfigError(f"OOD profile {path} has no {e.args[0]!r} entry") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"OOD profile {path} is invalid: {e}") from e
    if expected_features is not None and profile.n_features != expected_features:
        raise ConfigError(
            f"OOD profile {path} has {profile.n_features} features but the model's input has {expected_features}"
        )
    return profile


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> TrainingData:
    with open(path, newline="") as f:
        first = next(csv.reader(f), None)
    if first is None:
        raise ValueError("the file is empty")
    header = None if all(_is_number(cell) for cell in first) else tuple(cell.strip() for cell in first)
    rows = np.loadtxt(path, delimiter=",", skiprows=0 if header is None else 1, ndmin=2, dtype=np.float64)
    return TrainingData(rows, header)


def _read_parquet(path: Path) -> TrainingData:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Parquet needs pyarrow (pip install 'canary-gateway[export]')") from None
    table = pq.read_table(path)
    columns = [np.asarray(table.column(i).to_numpy(), dtype=np.float64) for i in range(table.num_columns)]
    rows = np.column_stack(columns) if columns else np.empty((table.num_rows, 0))
    return TrainingData(rows, tuple(table.column_names))


def load_training_data(path: str | os.PathLike[str]) -> TrainingData:
    """Numeric training rows from .npy (2-D), .csv (an optional header names the features) or .parquet."""
    source = Path(path)
    suffix = source.suffix.lower()
    try:
        if suffix == ".npy":
            data = TrainingData(np.asarray(np.load(source, allow_pickle=False), dtype=np.float64), None)
        elif suffix == ".csv":
            data = _read_csv(source)
        elif suffix == ".parquet":
            data = _read_parquet(source)
        else:
            raise ValueError("unknown format (use .npy, .csv or .parquet)")
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot read training data {source}: {e}") from e
    if data.rows.ndim != 2:
        raise ValueError(f"training data {source} must be 2-D (rows x features), got shape {data.rows.shape}")
    return data
