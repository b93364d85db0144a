"""Drift of live traffic away from a version's training data, per feature, and an alert with hysteresis.

The request path hands each request's rows to `DriftMonitor.observe` (a slice copy into a ring buffer of
the last `window` rows); a periodic task calls `report()`, which compares the window with the profile:
PSI on the training decile bins and the KS statistic on the training percentile grid. A feature drifts
when either crosses its threshold; the alert fires when a feature drifts with at least `min_rows` in the
window and clears only when every feature is back below `clear_ratio` of both thresholds, so a window
hovering at the threshold does not flap. `plot_drift` draws the drifting features for an operator
(`plot_histograms` draws the same from plain data, e.g. what the admin API returns).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.ood.profile import KS_POINTS, N_BINS, Array, Profile

PSI_EPSILON = 1e-4  # stands in for an empty bin's fraction: ln(0) would make PSI infinite


@dataclass(frozen=True, eq=False)
class DriftReport:
    """The window compared with the profile at one moment."""

    profile: Profile
    n_rows: int  # rows in the window
    psi: Array  # (F,) population stability index per feature
    ks: Array  # (F,) Kolmogorov-Smirnov statistic per feature (at the profile's percentile grid)
    live_fractions: Array  # (F, N_BINS) the window's fraction in each of the profile's PSI bins
    ood_rate: float  # fraction of the window's rows the scorer flagged
    drifting: tuple[int, ...]  # drifting feature indices, largest PSI first (none below min_rows)
    alert: bool
    changed: bool  # this report fired or cleared the alert: the caller logs it
    counts: WindowCounts | None = None  # the window it was computed from

    @property
    def drifting_features(self) -> tuple[str, ...]:
        return tuple(self.profile.feature_names[i] for i in self.drifting)


class DriftMonitor:
    """A window of a version's recent rows and the drift alert's state. One per version; not thread-safe."""

    def __init__(
        self,
        profile: Profile,
        window: int = 2000,
        psi_threshold: float = 0.2,
        ks_threshold: float = 0.2,
        min_rows: int = 500,
        clear_ratio: float = 0.8,
    ) -> None:
        """Defaults: PSI 0.2 is the usual "significant shift" line; KS 0.2 flags a shift of similar size
        (a normal feature whose mean moves by 0.45 std has PSI ~0.2 and KS ~0.18)."""
        if window < 1 or not 1 <= min_rows <= window:
            raise ValueError(f"need 1 <= min_rows ({min_rows}) <= window ({window})")
        if psi_threshold <= 0 or ks_threshold <= 0 or not 0 < clear_ratio <= 1:
            raise ValueError("thresholds must be positive and clear_ratio in (0, 1]")
        self.profile = profile
        self.window = window
        self.psi_threshold = psi_threshold
        self.ks_threshold = ks_threshold
        self.min_rows = min_rows
        self.clear_ratio = clear_ratio
        self.observed = 0  # rows observed since start
        self._rows = np.empty((window, profile.n_features))
        self._flagged = np.zeros(window, dtype=bool)
        self._next = 0  # ring position the next row goes to
        self._filled = 0
        self._alert = False
        self._pending: list[tuple[np.ndarray, npt.NDArray[np.bool_] | None]] = []  # deferred (rows, flags)
        self._pending_rows = 0

    @property
    def alert(self) -> bool:
        return self._alert

    def observe(self, rows: npt.ArrayLike, flagged: npt.ArrayLike | None = None) -> None:
        """Add a request's rows (n x F, any numeric dtype) and which of them the scorer flagged (a boolean
        mask of n; None: none). Flags are kept per row, so the window's OOD rate stays exact when only
        part of a batch is in the window."""
        array = np.asarray(rows)
        if array.ndim != 2 or array.shape[1] != self.profile.n_features:
            raise ValueError(
                f"rows of shape {array.shape} do not have the profile's {self.profile.n_features} features"
            )
        self._write(array, self._flags(len(array), flagged))

    def defer(self, rows: np.ndarray, flagged: npt.NDArray[np.bool_] | None) -> None:
        """`observe` at the next report instead of now: the request path only keeps a reference.

        For the serving core's budget: one ring write per report instead of one per request. `rows`
        must already be n x F (the scorer checked it) and must not change afterwards. At most a window's
        worth of rows wait; beyond that they are written at once.
        """
        self._pending.append((rows, flagged))
        self._pending_rows += len(rows)
        if self._pending_rows >= self.window:
            self._flush()

    @staticmethod
    def _flags(n: int, flagged: npt.ArrayLike | None) -> npt.NDArray[np.bool_]:
        if flagged is None:
            return np.zeros(n, dtype=bool)
        mask = np.asarray(flagged, dtype=bool)
        if mask.shape != (n,):
            raise ValueError(f"flagged has shape {mask.shape}; it must mark each of the {n} rows")
        return mask

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        rows = np.concatenate([r for r, _ in pending])
        flags = np.concatenate([self._flags(len(block), flagged) for block, flagged in pending])
        self._write(rows, flags)

    def _write(self, rows: np.ndarray, flags: npt.NDArray[np.bool_]) -> None:
        n = len(rows)
        self.observed += n
        if n > self.window:
            rows, flags, n = rows[n - self.window :], flags[n - self.window :], self.window
        first = min(n, self.window - self._next)
        self._put(self._next, rows[:first], flags[:first])
        self._put(0, rows[first:], flags[first:])
        self._next = (self._next + n) % self.window
        self._filled = min(self._filled + n, self.window)

    def _put(self, start: int, rows: np.ndarray, flags: npt.NDArray[np.bool_]) -> None:
        end = start + len(rows)
        self._rows[start:end] = rows
        self._flagged[start:end] = flags

    def rows(self) -> Array:
        """The window's rows, oldest first (a copy)."""
        self._flush()
        if self._filled < self.window:
            return self._rows[: self._filled].copy()
        return np.concatenate((self._rows[self._next :], self._rows[: self._next]))

    def report(self) -> DriftReport:
        """Compare the window with the profile and update the alert (O(window x F log window))."""
        report = self.peek()
        if self._alert:
            calm = np.all(report.psi < self.clear_ratio * self.psi_threshold) and np.all(
                report.ks < self.clear_ratio * self.ks_threshold
            )
            alert = not calm
        else:
            alert = bool(report.drifting)
        changed = alert != self._alert
        self._alert = alert
        return replace(report, alert=alert, changed=changed)

    def peek(self) -> DriftReport:
        """The comparison without touching the alert state (for metrics or a plot)."""
        report = compare(self.profile, self.counts(), self.psi_threshold, self.ks_threshold, self.min_rows)
        return replace(report, alert=self._alert)

    def counts(self) -> WindowCounts:
        """The window as counts against the profile's bins and grid (what adds up across workers)."""
        self._flush()
        profile = self.profile
        n = self._filled
        ordered = np.sort(self._rows[:n], axis=0)  # NaN sorts last and is left out below
        present = n - np.isnan(ordered).sum(axis=0)
        bins = np.zeros((profile.n_features, N_BINS), dtype=np.int64)
        at_or_below = np.zeros((profile.n_features, KS_POINTS), dtype=np.int64)
        for f in range(profile.n_features):
            m = int(present[f])
            column = ordered[:m, f]
            # Bin b holds edge[b] <= x < edge[b + 1], outer bins open-ended: as the profile counted training rows.
            below = np.searchsorted(column, profile.bin_edges[f, 1:-1], side="left")
            bins[f] = np.diff(below, prepend=0, append=m)
            at_or_below[f] = np.searchsorted(column, profile.ks_grid[f], side="right")
        return WindowCounts(n, int(self._flagged[:n].sum()), present.astype(np.int64), bins, at_or_below)


@dataclass(frozen=True, eq=False)
class WindowCounts:
    """A drift window as counts: per feature, values present, values per PSI bin and values at or below each
    KS grid point. PSI and KS are functions of these, and they add up, so the windows of several workers
    compare with the profile exactly as one window of all their rows would."""

    n_rows: int
    flagged: int
    present: npt.NDArray[np.int64]  # (F,)
    bins: npt.NDArray[np.int64]  # (F, N_BINS)
    at_or_below: npt.NDArray[np.int64]  # (F, KS_POINTS)

    def plus(self, other: WindowCounts) -> WindowCounts:
        return WindowCounts(
            self.n_rows + other.n_rows,
            self.flagged + other.flagged,
            self.present + other.present,
            self.bins + other.bins,
            self.at_or_below + other.at_or_below,
        )

    def to_lists(self) -> list[object]:
        return [self.n_rows, self.flagged, self.present.tolist(), self.bins.tolist(), self.at_or_below.tolist()]

    @classmethod
    def from_lists(cls, data: Sequence[object]) -> WindowCounts:
        n_rows, flagged, present, bins, at_or_below = data
        return cls(
            int(n_rows),  # type: ignore[call-overload]
            int(flagged),  # type: ignore[call-overload]
            np.asarray(present, dtype=np.int64),
            np.asarray(bins, dtype=np.int64),
            np.asarray(at_or_below, dtype=np.int64),
        )


def compare(
    profile: Profile, counts: WindowCounts, psi_threshold: float, ks_threshold: float, min_rows: int
) -> DriftReport:
    """PSI and KS per feature of a window (as counts) against the profile; the alert is left off."""
    n_features = profile.n_features
    psi = np.zeros(n_features)
    ks = np.zeros(n_features)
    live = np.zeros((n_features, N_BINS))
    for f in range(n_features):
        m = int(counts.present[f])
        if m == 0:
            continue
        live[f] = counts.bins[f] / m
        actual = np.maximum(live[f], PSI_EPSILON)
        expected = np.maximum(profile.bin_fractions[f], PSI_EPSILON)
        psi[f] = float(np.sum((actual - expected) * np.log(actual / expected)))
        ks[f] = float(np.max(np.abs(counts.at_or_below[f] / m - profile.ks_cdf[f])))
    drifting: tuple[int, ...] = ()
    if counts.n_rows >= min_rows:
        over = np.flatnonzero((psi > psi_threshold) | (ks > ks_threshold))
        drifting = tuple(int(i) for i in over[np.argsort(-psi[over], kind="stable")])
    ood_rate = counts.flagged / counts.n_rows if counts.n_rows else 0.0
    return DriftReport(profile, counts.n_rows, psi, ks, live, ood_rate, drifting, False, False, counts)


@dataclass(frozen=True)
class FeatureHistogram:
    """One feature on the profile's PSI bins, as plain data: what a drift plot draws, so a client can also
    plot what the admin API returns."""

    name: str
    bin_edges: Sequence[float]  # n_bins + 1 training quantiles; the outer bins are open-ended
    training_fractions: Sequence[float]
    live_fractions: Sequence[float]
    psi: float
    ks: float


def plot_histograms(histograms: Sequence[FeatureHistogram], title: str, path: str | os.PathLike[str]) -> Path:
    """Draw each feature's live fractions beside its training ones, one panel per feature, into a PNG.

    Needs matplotlib (the `plot` extra).
    """
    from matplotlib.figure import Figure  # optional dependency; the object API leaves pyplot's global state alone

    figure = Figure(figsize=(6.4, 0.4 + 2.6 * len(histograms)), layout="constrained")
    axes = figure.subplots(len(histograms), 1, squeeze=False)[:, 0]
    for ax, histogram in zip(axes, histograms, strict=True):
        edges = histogram.bin_edges
        n_bins = len(histogram.training_fractions)
        positions = np.arange(n_bins)
        ax.bar(positions - 0.2, histogram.training_fractions, width=0.4, label="training")
        ax.bar(positions + 0.2, histogram.live_fractions, width=0.4, label="live")
        labels = [f"<{edges[1]:.3g}", *(f"{edges[b]:.3g}–{edges[b + 1]:.3g}" for b in range(1, n_bins - 1))]
        ax.set_xticks(positions, [*labels, f"≥{edges[n_bins - 1]:.3g}"], rotation=30, fontsize=7)
        ax.set_ylabel("fraction of rows")
        ax.set_title(f"{histogram.name}: PSI {histogram.psi:.2f}, KS {histogram.ks:.2f}")
        ax.legend(fontsize=8)
    figure.suptitle(title)
    target = Path(path)
    figure.savefig(target, dpi=100)
    return target


def plot_drift(source: DriftReport | DriftMonitor, path: str | os.PathLike[str], max_features: int = 8) -> Path:
    """Plot the drifting features (largest PSI first; the largest-PSI feature when none drifts) into a PNG."""
    report = source.peek() if isinstance(source, DriftMonitor) else source
    profile = report.profile
    features = list(report.drifting[:max_features]) or [int(np.argmax(report.psi))]
    histograms = [
        FeatureHistogram(
            profile.feature_names[f],
            profile.bin_edges[f].tolist(),
            profile.bin_fractions[f].tolist(),
            report.live_fractions[f].tolist(),
            float(report.psi[f]),
            float(report.ks[f]),
        )
        for f in features
    ]
    state = "ALERT" if report.alert else "no alert"
    title = f"drift over {report.n_rows} rows (training decile bins); OOD rate {report.ood_rate:.1%}; {state}"
    return plot_histograms(histograms, title, path)
