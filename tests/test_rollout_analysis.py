"""The canary gates as pure functions: the tests behind them, checked against brute force, and the
verdicts on windows a rollout meets (too little data, a bad candidate, a candidate that is fine)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from gateway.errors import InvalidArgument
from gateway.shadows import outputs_agree
from gateway.stats import LATENCY_BUCKETS, Counts, bucket_upper_ns, latency_bucket
from router.analysis import (
    Agreement,
    Thresholds,
    agreement_gate,
    binomial_greater,
    error_gate,
    evaluate,
    fisher_greater,
    latency_gate,
    ood_gate,
    overall,
)
from router.rollout import Plan

TH = Thresholds(min_requests=30)


def counts(latencies_ms: list[float], errors: int = 0, scored: int = 0, flagged: int = 0) -> Counts:
    histogram = [0] * LATENCY_BUCKETS
    for ms in latencies_ms:
        histogram[latency_bucket(int(ms * 1e6))] += 1
    return Counts(len(latencies_ms) + errors, errors, scored, flagged, tuple(histogram))


def test_fisher_matches_the_hypergeometric_tail_by_brute_force() -> None:
    for xc, nc, xb, nb in [(1, 30, 0, 200), (3, 10, 1, 12), (0, 5, 4, 9), (7, 40, 20, 400), (5, 5, 0, 5)]:
        total, events = nc + nb, xc + xb
        exact = sum(
            math.comb(events, k) * math.comb(total - events, nc - k) for k in range(xc, min(events, nc) + 1)
        ) / math.comb(total, nc)
        assert fisher_greater(xc, nc, xb, nb) == pytest.approx(exact, rel=1e-9)


def test_binomial_tail_matches_brute_force() -> None:
    for k, n in [(0, 10), (1, 30), (2, 150), (5, 40), (30, 30)]:
        exact = sum(math.comb(n, i) * 0.01**i * 0.99 ** (n - i) for i in range(k, n + 1))
        assert binomial_greater(k, n, 0.01) == pytest.approx(exact, rel=1e-9)


def test_one_error_in_a_small_window_is_not_significant() -> None:
    """Where a z-test says z = 2.6 ("worse"), Fisher says p = 0.13: one error proves nothing."""
    result = error_gate(counts([1.0] * 29, errors=1), counts([1.0] * 200), TH, 0.95)
    assert result.verdict == "pass" and result.figures["p_value"] == pytest.approx(0.1304, abs=1e-3)


def test_error_gate_waits_fails_and_tolerates_its_margin() -> None:
    assert error_gate(counts([1.0] * 20, errors=5), counts([1.0] * 500), TH, 0.95).verdict == "wait"
    failing = error_gate(counts([1.0] * 24, errors=6), counts([1.0] * 270), TH, 0.95)
    assert failing.verdict == "fail" and failing.figures["candidate_rate"] == pytest.approx(0.2)
    assert "error rate 20.00% (6/30)" in failing.summary
    # Significant on a large window, but only 0.5 pp worse: within the 1 pp margin.
    small = error_gate(counts([1.0] * 19_800, errors=200), counts([1.0] * 19_900, errors=100), TH, 0.95)
    assert small.figures["p_value"] < 0.001 and small.verdict == "pass"


def test_latency_gate_fails_a_slow_candidate_not_one_slow_answer() -> None:
    rng = random.Random(1)
    baseline = counts([rng.uniform(0.5, 2.5) for _ in range(400)])
    slow = latency_gate(counts([rng.uniform(8, 12) for _ in range(30)]), baseline, TH, 0.999)
    assert slow.verdict == "fail" and slow.figures["slower"] == 30 and slow.figures["ratio"] > 3
    one_outlier = counts([rng.uniform(0.5, 2.5) for _ in range(29)] + [40.0])
    assert latency_gate(one_outlier, baseline, TH, 0.95).verdict == "pass"
    assert latency_gate(counts([10.0] * 29), baseline, TH, 0.95).verdict == "wait"
    # Failed requests are not answers: 30 requests of which 5 failed are too few answers.
    assert latency_gate(counts([10.0] * 25, errors=5), baseline, TH, 0.95).verdict == "wait"


def test_latency_slack_spares_sub_millisecond_jitter() -> None:
    baseline = counts([0.2] * 400)
    jittery = counts([0.6] * 40)  # 3x the baseline's p99, but 0.4 ms over it: within the 1 ms slack
    assert latency_gate(jittery, baseline, TH, 0.95).verdict == "pass"
    assert latency_gate(jittery, baseline, Thresholds(min_requests=30, p99_slack_ms=0.0), 0.95).verdict == "fail"


def test_ood_gate_compares_scored_rates_or_says_why_not() -> None:
    unscored = ood_gate(counts([1.0] * 40), counts([1.0] * 400, scored=400, flagged=4), TH, 0.95)
    assert unscored.verdict == "pass" and "candidate scores no request" in unscored.summary
    worse = ood_gate(counts([1.0] * 40, scored=40, flagged=12), counts([1.0] * 400, scored=400, flagged=4), TH, 0.95)
    assert worse.verdict == "fail"
    few = ood_gate(counts([1.0] * 40, scored=10, flagged=5), counts([1.0] * 400, scored=400), TH, 0.95)
    assert few.verdict == "wait"


def test_agreement_gate_needs_confidence_either_way() -> None:
    assert agreement_gate(Agreement(29, 0), TH, 0.95).verdict == "wait"
    assert agreement_gate(Agreement(30, 0), TH, 0.999).verdict == "fail"
    assert agreement_gate(Agreement(100, 100), TH, 0.95).verdict == "pass"
    borderline = agreement_gate(Agreement(100, 93), TH, 0.95)  # below 95%, but 95% is within its bound
    assert borderline.verdict == "wait" and borderline.figures["upper_bound"] > 0.95


def test_interim_looks_are_stricter_than_the_final_one() -> None:
    candidate, baseline = counts([1.0] * 28, errors=2), counts([1.0] * 300)  # Fisher p = 0.008
    final = evaluate(candidate, baseline, None, TH, final=True)
    interim = evaluate(candidate, baseline, None, TH, final=False)
    assert [r.gate for r in final] == ["errors", "p99_latency", "ood"]  # no agreement without shadow figures
    assert (final[0].verdict, interim[0].verdict) == ("fail", "pass")


def test_overall_verdict() -> None:
    fine = evaluate(counts([1.0] * 40), counts([1.0] * 400), Agreement(40, 40), TH, final=True)
    assert overall(fine) == "pass" and len(fine) == 4
    waiting = evaluate(counts([1.0] * 40), counts([1.0] * 400), Agreement(10, 10), TH, final=True)
    assert overall(waiting) == "wait"


def test_latency_buckets_cover_every_latency_contiguously() -> None:
    rng = random.Random(2)
    for ns in [0, 1, 15, 16, 17, 31, 32, 1000, 999_999, *[rng.randrange(2**50) for _ in range(2000)]]:
        bucket = latency_bucket(ns)
        low = bucket_upper_ns(bucket - 1) + 1 if bucket else 0
        assert low <= ns <= bucket_upper_ns(bucket) and bucket_upper_ns(bucket) <= low * 1.125 + 16
    assert latency_bucket(2**63 - 1) < LATENCY_BUCKETS


def test_counts_make_windows() -> None:
    before = counts([1.0] * 10, errors=1)
    after = counts([1.0] * 10 + [5.0] * 4, errors=3, scored=6, flagged=2)
    window = after.since(before)
    assert (window.requests, window.errors, window.ood_scored, window.ood_flagged) == (6, 2, 6, 2)
    assert window.latency_quantile_ms(0.99) == pytest.approx(5.0, rel=0.13)
    assert Counts().since(Counts()) == Counts() and Counts().latency_quantile_ms(0.99) == 0.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": (1000, 500, 10000)}, "increasing"),
        ({"steps": (1000, 5000)}, "must be 100"),
        ({"steps": ()}, "empty"),
        ({"interval_s": 0.0}, "interval_s"),
        ({"interval_s": math.nan}, "^interval_s: nan"),
        ({"interval_s": math.inf}, "^interval_s: inf"),
        ({"shadow_s": math.nan}, "^shadow_s: nan"),
        ({"shadow_s": math.inf}, "^shadow_s: inf"),
        ({"shadow_s": 5.0, "shadow_requests": 10}, "not both"),
        ({"step_shadow_bps": 20000}, "step_shadow_bps"),
        ({"candidate": ""}, "candidate"),
    ],
)
def test_plans_are_validated(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"model": "m", "candidate": "2", "steps": (100, 10000), "interval_s": 1.0}
    with pytest.raises(InvalidArgument, match=message):
        Plan(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"min_requests": 0},
        {"confidence": 1.0},
        {"max_p99_ratio": 0.9},
        {"min_agreement": 1.5},
        {"max_p99_ratio": math.inf},  # would switch the latency gate off
        {"p99_slack_ms": math.inf},
        {"p99_slack_ms": math.nan},
    ],
)
def test_thresholds_are_validated(fields: dict[str, float]) -> None:
    with pytest.raises(InvalidArgument):
        Thresholds(**fields)  # type: ignore[arg-type]


def test_plans_survive_their_stored_form() -> None:
    plan = Plan("m", "2", (100, 2500, 10000), 30.0, shadow_requests=500, thresholds=Thresholds(min_requests=7))
    assert Plan.from_dict(plan.to_dict()) == plan


def test_regressor_answers_agree_within_the_models_relative_difference() -> None:
    primary = [np.array([[100.0], [-20.0]], dtype=np.float32)]
    close = [np.array([[104.0], [-20.9]], dtype=np.float32)]  # 4% and 4.5% off
    far = [np.array([[104.0], [-21.5]], dtype=np.float32)]  # the second is 7.5% off
    assert outputs_agree(primary, close, rtol=0.05)
    assert not outputs_agree(primary, far, rtol=0.05)
    assert not outputs_agree(primary, close)  # the default, 1e-3, is for scores that should match exactly
    labels = [np.array([1, 0], dtype=np.int64)]
    assert outputs_agree(labels, [np.array([1, 0], dtype=np.int64)], rtol=0.5)
    assert not outputs_agree(labels, [np.array([1, 1], dtype=np.int64)], rtol=0.5)  # labels must be equal
