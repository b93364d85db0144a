"""Drift on real data (digits: 1797 rows, half for the profile, half as live traffic): shifted traffic
crosses the PSI/KS thresholds and fires the alert, held-out traffic does not, the alert clears with
hysteresis, and the ring buffer keeps exactly the newest rows."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from gateway.ood.drift import DriftMonitor, FeatureHistogram, WindowCounts, compare, plot_drift, plot_histograms
from gateway.ood.profile import Profile, build_profile

SHIFTED = [20, 28, 36]  # three central pixels, busy in every digit


@pytest.fixture(scope="module")
def digits() -> tuple[Profile, np.ndarray, np.ndarray]:
    data = load_digits()
    train, live, _, live_labels = train_test_split(
        data.data, data.target, test_size=0.5, random_state=0, stratify=data.target
    )
    return build_profile(train), live, live_labels


def _shifted(profile: Profile, live: np.ndarray) -> np.ndarray:
    rows = live.copy()
    rows[:, SHIFTED] += 0.5 * profile.std[SHIFTED]
    return rows


def test_held_out_traffic_does_not_drift(digits: tuple[Profile, np.ndarray, np.ndarray]) -> None:
    """With ~900 rows on each side, PSI of a stable feature is ~(bins-1)(1/n+1/m) = 0.02 on average:
    the largest over 64 features stays well under half the threshold."""
    profile, live, _ = digits
    monitor = DriftMonitor(profile, window=len(live), min_rows=400)
    monitor.observe(live)
    report = monitor.report()
    assert report.n_rows == len(live)
    assert report.drifting == () and not report.alert and not report.changed
    assert report.psi.max() < 0.1 and report.ks.max() < 0.1


def test_shifted_features_drift_and_fire_the_alert(digits: tuple[Profile, np.ndarray, np.ndarray]) -> None:
    profile, live, _ = digits
    monitor = DriftMonitor(profile, window=len(live), min_rows=400)
    monitor.observe(_shifted(profile, live))
    report = monitor.report()
    assert sorted(report.drifting) == SHIFTED
    assert report.drifting_features[0] in {f"x{i}" for i in SHIFTED}
    # Integer pixels: a 0.5-std shift moves whole values across the decile edges or not, so PSI alone
    # can miss a feature (it did for one of the three on other splits); KS sees all three.
    assert (report.ks[SHIFTED] > monitor.ks_threshold).all()
    assert report.psi[SHIFTED].max() > monitor.psi_threshold
    assert report.alert and report.changed and monitor.alert
    again = monitor.report()
    assert again.alert and not again.changed


def test_a_different_class_mix_fires_the_alert(digits: tuple[Profile, np.ndarray, np.ndarray]) -> None:
    """Real covariate shift: traffic of only zeros and ones (the profile saw all ten digits)."""
    profile, live, labels = digits
    zeros_and_ones = live[np.isin(labels, [0, 1])]
    monitor = DriftMonitor(profile, window=len(zeros_and_ones), min_rows=150)
    monitor.observe(zeros_and_ones)
    report = monitor.report()
    assert report.alert and len(report.drifting) > 10


def test_no_alert_below_min_rows(digits: tuple[Profile, np.ndarray, np.ndarray]) -> None:
    profile, live, _ = digits
    monitor = DriftMonitor(profile, window=800, min_rows=400)
    monitor.observe(_shifted(profile, live)[:399])
    report = monitor.report()
    assert report.psi[SHIFTED].max() > monitor.psi_threshold  # measured, but not yet trusted
    assert report.drifting == () and not report.alert
    monitor.observe(_shifted(profile, live)[399:400])
    assert monitor.report().alert


def test_alert_clears_when_normal_traffic_returns(digits: tuple[Profile, np.ndarray, np.ndarray]) -> None:
    profile, live, _ = digits
    window = 400
    monitor = DriftMonitor(profile, window=window, min_rows=200)
    monitor.observe(_shifted(profile, live)[:window])
    assert monitor.report().changed and monitor.alert
    for start in range(window, 2 * window, 50):  # normal traffic, a request of 50 rows at a time
        monitor.observe(live[start : start + 50])
    report = monitor.report()
    assert not report.alert and report.changed and not monitor.alert
    assert np.array_equal(monitor.rows(), live[window : 2 * window])


def test_hysteresis_keeps_the_alert_between_the_clear_level_and_the_threshold(
    digits: tuple[Profile, np.ndarray, np.ndarray],
) -> None:
    """Traffic whose worst feature sits at 90% of the threshold: it neither fires a quiet monitor nor
    clears an alerting one (the clear level is 80%)."""
    profile, live, _ = digits
    mixed = np.concatenate((_shifted(profile, live)[:200], live[200:800]))
    probe = DriftMonitor(profile, window=800, min_rows=400)
    probe.observe(mixed)
    level = probe.peek().psi.max()
    settings = {"window": 800, "min_rows": 400, "psi_threshold": level / 0.9, "ks_threshold": 1.0}

    quiet = DriftMonitor(profile, **settings)
    quiet.observe(mixed)
    assert not quiet.report().alert

    alerting = DriftMonitor(profile, **settings)
    alerting.observe(_shifted(profile, live)[:800])
    assert alerting.report().alert
    alerting.observe(mixed)
    report = alerting.report()
    assert report.alert and not report.changed
    alerting.observe(live[:800])
    assert not alerting.report().alert


def test_ring_buffer_keeps_the_newest_rows_in_order() -> None:
    profile = build_profile(np.random.default_rng(0).standard_normal((50, 2)))
    monitor = DriftMonitor(profile, window=5, min_rows=1)
    sequence = np.arange(40, dtype=np.float64).reshape(20, 2)  # row i is [2i, 2i+1]
    seen = 0
    for size in (3, 1, 4, 0, 2, 7, 3):  # wraps several times; 7 > window
        monitor.observe(sequence[seen : seen + size].astype(np.float32))
        seen += size
        np.testing.assert_array_equal(monitor.rows(), sequence[max(seen - 5, 0) : seen])
    assert monitor.observed == seen == 20


def _mask(n: int, *flagged: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[list(flagged)] = True
    return mask


def test_ood_rate_counts_the_window_flags() -> None:
    profile = build_profile(np.random.default_rng(0).standard_normal((50, 2)))
    monitor = DriftMonitor(profile, window=10, min_rows=1)
    rows = np.zeros((4, 2))
    monitor.observe(rows, _mask(4, 0, 1, 2, 3))
    assert monitor.peek().ood_rate == pytest.approx(1.0)
    monitor.observe(rows, _mask(4, 3))
    monitor.observe(rows[:2])
    assert monitor.peek().ood_rate == pytest.approx(5 / 10)  # 4 + 1 + 0 of the 10 rows in the window
    monitor.observe(rows)  # the first batch (4 flagged) leaves the window
    assert monitor.peek().ood_rate == pytest.approx(1 / 10)
    # Only the newest 10 of a batch stay: its flags are per row, so the rate is that of those rows. (Flags
    # used to be a count, marking the batch's first rows: this batch's tail of 10 flagged rows read 0.)
    monitor.observe(np.zeros((30, 2)), _mask(30, *range(20, 30)))
    assert monitor.peek().ood_rate == pytest.approx(1.0)
    monitor.observe(np.zeros((30, 2)), _mask(30, *range(10)))
    assert monitor.peek().ood_rate == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"flagged has shape \(5,\); it must mark each of the 4 rows"):
        monitor.observe(rows, np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="do not have the profile's 2 features"):
        monitor.observe(np.zeros((4, 3)))


def test_deferred_rows_equal_observed_rows() -> None:
    """The request path defers its rows to the next report; the window must be the same as observing them."""
    profile = build_profile(np.random.default_rng(0).standard_normal((50, 2)))
    direct = DriftMonitor(profile, window=6, min_rows=1)
    deferred = DriftMonitor(profile, window=6, min_rows=1)
    sequence = np.arange(30, dtype=np.float32).reshape(15, 2)
    seen = 0
    for size, flagged in ((2, [1]), (1, []), (4, [0, 1, 2, 3]), (3, []), (5, [2, 4])):  # the last defer flushes
        block = sequence[seen : seen + size]
        direct.observe(block, _mask(size, *flagged))
        deferred.defer(block, _mask(size, *flagged) if flagged else None)
        seen += size
        assert deferred.peek().ood_rate == pytest.approx(direct.peek().ood_rate)
        np.testing.assert_array_equal(deferred.rows(), direct.rows())
    assert deferred.observed == direct.observed == 15


def test_observe_copies_rows_without_allocating(digits: tuple[Profile, np.ndarray, np.ndarray]) -> None:
    profile, live, _ = digits
    monitor = DriftMonitor(profile, window=2000)
    batch = live[:256].astype(np.float32)  # 64 KB; a converted copy would be 128 KB
    monitor.observe(batch)
    flags = _mask(len(batch), 0, 1, 2)
    tracemalloc.start()
    try:
        for _ in range(100):
            monitor.observe(batch, flags)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_000


def test_report_is_cheap_and_deterministic(digits: tuple[Profile, np.ndarray, np.ndarray]) -> None:
    profile, live, _ = digits
    monitor = DriftMonitor(profile, window=2000)
    monitor.observe(np.concatenate((live, live, live)))
    start = time.perf_counter()
    first = monitor.peek()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.25, f"report took {elapsed * 1000:.0f} ms for 2000 rows x 64 features"  # ~5 ms typical
    second = monitor.peek()
    np.testing.assert_array_equal(first.psi, second.psi)
    np.testing.assert_array_equal(first.ks, second.ks)


def test_plot_draws_the_drifting_features(digits: tuple[Profile, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    profile, live, _ = digits
    monitor = DriftMonitor(profile, window=len(live), min_rows=400)
    monitor.observe(_shifted(profile, live))
    drifting = plot_drift(monitor.report(), tmp_path / "drift.png")
    calm_monitor = DriftMonitor(profile, window=len(live), min_rows=400)
    calm_monitor.observe(live)
    calm = plot_drift(calm_monitor, tmp_path / "calm.png")
    for path in (drifting, calm):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Three panels against one: the drifting plot is taller.
    assert _png_height(drifting) > 2 * _png_height(calm)


def test_histograms_plot_from_plain_data(tmp_path: Path) -> None:
    """What a client holds after the admin API: lists of numbers, no profile."""
    histogram = FeatureHistogram("age", list(range(11)), [0.1] * 10, [0.0] * 9 + [1.0], psi=4.2, ks=0.9)
    path = plot_histograms([histogram, histogram], "two panels", tmp_path / "plain.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _png_height(path) > 400


def _png_height(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")


def test_windows_of_several_workers_add_up_to_one_window_of_all_their_rows(
    digits: tuple[Profile, np.ndarray, np.ndarray],
) -> None:
    profile, live, _ = digits
    rows = np.vstack([live[:300], _shifted(profile, live[300:700])])
    rows[5, 3] = np.nan  # a missing value counts in neither bins nor grid, on either side
    one, two, together = (DriftMonitor(profile, window=len(rows), min_rows=100) for _ in range(3))
    one.observe(rows[:250], _mask(250, 0, 1, 2))
    two.observe(rows[250:], _mask(len(rows) - 250, *range(7)))
    together.observe(rows)
    merged = compare(profile, one.counts().plus(two.counts()), 0.2, 0.2, 100)
    alone = together.peek()
    np.testing.assert_allclose(merged.psi, alone.psi)
    np.testing.assert_allclose(merged.ks, alone.ks)
    np.testing.assert_allclose(merged.live_fractions, alone.live_fractions)
    assert merged.drifting == alone.drifting and set(merged.drifting) >= set(SHIFTED)
    assert merged.n_rows == len(rows) and merged.ood_rate == pytest.approx(10 / len(rows))
    again = WindowCounts.from_lists(one.counts().to_lists())
    assert np.array_equal(again.bins, one.counts().bins) and again.n_rows == 250
