"""Request-path OOD scoring: each row's Mahalanobis distance to the version's profile, and why.

`OodScorer.score` runs the native kernel (`native/ood.pyx`) on a request's rows and returns an
`OodResult`: per-row scores, the request-level maximum and flag, and the features with the largest
|z-scores| for the response parameters (`ood`, `ood_score`, `ood_features`). `reference_scores` is
the same computation in plain numpy: the tests check the kernel against it and the benchmark times both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.ood.profile import Array, Profile
from native.ood import Kernel

IndexArray = npt.NDArray[np.intp]


def _rank(z: Array) -> Array:
    """|z|, with a non-finite z (from a NaN or infinite input) ranked above every finite one."""
    magnitude = np.abs(z)
    return np.where(np.isfinite(magnitude), magnitude, np.inf)


@dataclass(slots=True, eq=False)
class OodResult:
    """The scores of one request's rows. The arrays belong to the result (not shared with the scorer)."""

    scores: Array  # (n,) Mahalanobis distance per row; +inf for a row with a NaN or infinite value
    top_index: IndexArray  # (n, k) each row's features with the largest |z|, largest first
    top_z: Array  # (n, k) their z-scores
    max_score: float  # the request's score: the largest row score (0.0 for no rows)
    threshold: float
    feature_names: tuple[str, ...]
    any_flagged: bool = False  # some row is out of distribution (set from the scores when built)

    def __post_init__(self) -> None:
        self.any_flagged = self.max_score > self.threshold

    @property
    def flagged(self) -> npt.NDArray[np.bool_]:
        """Per row: out of distribution (above the threshold, or not finite)."""
        return ~(self.scores <= self.threshold)

    def worst_features(self) -> list[tuple[str, float]]:
        """Up to k (feature name, z) pairs, largest |z| first, over the flagged rows (else the worst row).

        A feature appears once, with its most extreme z among those rows.
        """
        if len(self.scores) == 0:
            return []
        rows = np.flatnonzero(self.flagged) if self.any_flagged else [int(np.argmax(self.scores))]
        index = self.top_index[rows].ravel()
        z = self.top_z[rows].ravel()
        k = self.top_index.shape[1]
        chosen: dict[int, float] = {}
        for i in np.lexsort((index, -_rank(z))):
            chosen.setdefault(int(index[i]), float(z[i]))
            if len(chosen) == k:
                break
        return [(self.feature_names[j], value) for j, value in chosen.items()]

    def features_text(self) -> str:
        """The `ood_features` response parameter, e.g. "x3=+7.2,x10=-5.1"."""
        return ",".join(f"{name}={z:+.1f}" for name, z in self.worst_features())


def _as_rows(rows: npt.ArrayLike, n_features: int) -> npt.NDArray[np.float32]:
    array = np.ascontiguousarray(rows, np.float32)
    if array.ndim != 2:
        raise ValueError(f"OOD scoring needs rows x features, got shape {array.shape}")
    if array.shape[1] != n_features:
        raise ValueError(f"rows have {array.shape[1]} features but the OOD profile has {n_features}")
    return array


class OodScorer:
    """Scores rows against one profile; build one per model version at load time and reuse it."""

    def __init__(self, profile: Profile, top_k: int = 3) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.profile = profile
        self.top_k = min(top_k, profile.n_features)
        # The kernel owns copies of the profile's arrays and its per-row scratch, made once here.
        self._kernel = Kernel(profile.mean, profile.inverse_covariance, profile.scale, self.top_k)
        # Read per call: plain attributes cost less than the profile's property and attribute chain.
        self._n_features = profile.n_features
        self._threshold = profile.threshold
        self._names = profile.feature_names

    def score(self, rows: npt.ArrayLike) -> OodResult:
        """Score a (n_rows x n_features) block; any dtype, converted to float32 once (as the model sees it)."""
        x = _as_rows(rows, self._n_features)
        n = x.shape[0]
        k = self.top_k
        # Fresh outputs per call: a result may outlive the next call (the batcher answers requests later).
        scores = np.empty(n)
        top_index = np.empty((n, k), np.intp)
        top_z = np.empty((n, k))
        largest = self._kernel.score(x, scores, top_index, top_z)
        return OodResult(scores, top_index, top_z, largest, self._threshold, self._names)


def reference_scores(rows: npt.ArrayLike, profile: Profile, top_k: int = 3) -> OodResult:
    """`OodScorer.score` in plain numpy: the reference the native kernel must equal."""
    x = _as_rows(rows, profile.n_features).astype(np.float64)
    k = min(top_k, profile.n_features)
    d = x - profile.mean
    finite = np.isfinite(d)
    safe = np.where(finite, d, 0.0)  # a row with a non-finite value scores inf below; this only avoids NaN warnings
    squared = np.einsum("ij,jk,ik->i", safe, profile.inverse_covariance, safe)
    scores = np.where(finite.all(axis=1), np.sqrt(np.maximum(squared, 0.0)), np.inf)
    z = d / profile.scale
    top_index = np.argsort(-_rank(z), axis=1, kind="stable")[:, :k]
    top_z = np.take_along_axis(z, top_index, axis=1)
    largest = float(scores.max()) if len(scores) else 0.0
    return OodResult(scores, top_index, top_z, largest, profile.threshold, profile.feature_names)
