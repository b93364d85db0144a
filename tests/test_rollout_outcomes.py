"""Outcome gates (router.outcomes): the statistics behind them, against scipy and Newcombe's published
intervals, and the verdicts they give on windows of labelled requests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.errors import InvalidArgument
from router.analysis import Thresholds, newcombe_bounds, wilson_bounds
from router.outcomes import (
    Group,
    Labelled,
    Measured,
    accuracy_gate,
    equal_opportunity_gate,
    evaluate_outcomes,
    mae_gate,
    mean_difference_lower,
)
from router.rollout import Plan

# --- the statistics ------------------------------------------------------------------------------------


def test_newcombe_interval_reproduces_the_published_examples() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873-890, table II, method 10: 95% two-sided intervals,
    # i.e. one-sided bounds at 97.5% each.
    assert newcombe_bounds(56, 70, 48, 80, 0.975) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert newcombe_bounds(9, 10, 3, 10, 0.975) == pytest.approx((0.1705, 0.8090), abs=5e-5)
    # It stays inside [-1, 1] where the Wald interval would not, and is antisymmetric.
    low, high = newcombe_bounds(10, 10, 0, 10, 0.975)
    assert 0 < low < 1 and high == 1.0
    assert newcombe_bounds(3, 10, 9, 10, 0.975) == pytest.approx((-0.8090, -0.1705), abs=5e-5)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (45, 50), (50, 50), (812, 1000), (1, 3)])
@pytest.mark.parametrize("confidence", [0.95, 0.975, 0.999])
def test_wilson_bounds_equal_scipys(k: int, n: int, confidence: float) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")  # installed with scikit-learn (the test extra)
    expected = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=2 * confidence - 1, method="wilson")
    assert wilson_bounds(k, n, confidence) == pytest.approx((expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize(("n", "tolerance"), [(400, 0.003), (30, 0.03)])
def test_mae_bound_is_welchs_with_a_normal_quantile(n: int, tolerance: float) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    candidate, baseline = np.abs(rng.normal(0.3, 1.0, n)), np.abs(rng.normal(0.0, 0.8, n + 7))
    args = (candidate.mean(), candidate.var(ddof=1), n, baseline.mean(), baseline.var(ddof=1), n + 7)
    lower = mean_difference_lower(*args, 0.95)
    welch = scipy_stats.ttest_ind(candidate, baseline, equal_var=False, alternative="greater")
    expected = welch.confidence_interval(confidence_level=0.95).low
    difference = candidate.mean() - baseline.mean()
    # The same standard error; only the quantile differs (normal vs t), by less than `tolerance`.
    assert (difference - lower) == pytest.approx(difference - expected, rel=tolerance)
    assert lower < difference


def _classified(n: int, correct: int, groups: tuple[Group, ...] = ()) -> Labelled:
    return Labelled(n, correct=correct, groups=groups)


def test_accuracy_gate_waits_for_labels_then_fails_only_beyond_its_margin() -> None:
    th = Thresholds(min_labelled=50, accuracy_not_worse_by=0.02)
    (waiting,) = evaluate_outcomes(Measured(_classified(49, 5), _classified(500, 450), 30), th, 0.95)
    assert waiting.verdict == "wait" and "candidate 49, baseline 500; need 50 each" in waiting.summary
    assert accuracy_gate(_classified(50, 5), _classified(50, 45), th, 0.95).verdict == "fail"
    # 3 pp lower on a small sample: not evidence of more than 2 pp.
    assert accuracy_gate(_classified(100, 87), _classified(100, 90), th, 0.95).verdict == "pass"
    # 3 pp lower on 20,000 requests a side is: the upper bound of the difference is below -2 pp.
    big = accuracy_gate(_classified(20_000, 17_400), _classified(20_000, 18_000), th, 0.95)
    assert big.verdict == "fail" and big.figures["upper_bound"] < -0.02
    # ...and within a 5 pp margin it passes.
    assert (
        accuracy_gate(
            _classified(20_000, 17_400),
            _classified(20_000, 18_000),
            Thresholds(min_labelled=50, accuracy_not_worse_by=0.05),
            0.95,
        ).verdict
        == "pass"
    )
    # A stricter (interim) confidence needs stronger evidence.
    edge = (_classified(400, 340), _classified(400, 364))
    assert accuracy_gate(*edge, th, 0.95).verdict == "fail" and accuracy_gate(*edge, th, 0.999).verdict == "pass"


def test_mae_gate_fails_a_regressor_whose_errors_grew_by_more_than_the_margin() -> None:
    th = Thresholds(min_labelled=30, mae_not_worse_by=0.1)
    worse = Labelled(200, mae=0.5, abs_error_var=0.04)
    base = Labelled(200, mae=0.2, abs_error_var=0.04)
    assert mae_gate(worse, base, th, 0.95).verdict == "fail"
    assert mae_gate(Labelled(200, mae=0.25, abs_error_var=0.04), base, th, 0.95).verdict == "pass"
    (waiting,) = evaluate_outcomes(Measured(Labelled(20, mae=9.0, abs_error_var=0.04), base, 30), th, 0.95)
    assert (waiting.gate, waiting.verdict) == ("mae", "wait")


def test_equal_opportunity_gate_compares_the_tpr_gaps_between_groups() -> None:
    th = Thresholds(min_labelled=50, max_equal_opportunity_gap_increase=0.1, fairness_attribute="region")
    fair = (Group("north", 200, 100, 95), Group("south", 200, 100, 94))
    biased = (Group("north", 200, 100, 10), Group("south", 200, 100, 95))
    slightly = (Group("north", 200, 100, 88), Group("south", 200, 100, 95))
    base = _classified(400, 380, fair)
    failed = equal_opportunity_gate(_classified(400, 300, biased), base, th, 0.95, min_group=30)
    assert failed.verdict == "fail" and failed.figures["candidate_gap"] == pytest.approx(0.85)
    assert "north 0.10" in failed.summary and failed.figures["candidate_gap_low"] > failed.figures["baseline_gap_high"]
    assert equal_opportunity_gate(_classified(400, 370, slightly), base, th, 0.95, min_group=30).verdict == "pass"
    # Groups below the model's fairness_min_group do not count: with one group left, it waits.
    small = (Group("north", 20, 10, 1), Group("south", 380, 190, 180))
    waiting = equal_opportunity_gate(_classified(400, 300, small), base, th, 0.95, min_group=30)
    assert waiting.verdict == "wait" and "candidate 1, baseline 2; need 2 each" in waiting.summary


def test_outcome_thresholds_are_validated_and_survive_the_plans_stored_form() -> None:
    for fields in (
        {"max_equal_opportunity_gap_increase": 0.1},  # which attribute?
        {"fairness_attribute": "region"},  # which increase?
        {"accuracy_not_worse_by": 1.5},
        {"accuracy_not_worse_by": 0.01, "mae_not_worse_by": 1.0},
        {"mae_not_worse_by": math.inf},
        {"min_labelled": 0},
    ):
        with pytest.raises(InvalidArgument):
            Thresholds(**fields)  # type: ignore[arg-type]
    th = Thresholds(accuracy_not_worse_by=0.0, max_equal_opportunity_gap_increase=0.05, fairness_attribute="r")
    assert th.outcome_gates == ("accuracy", "equal_opportunity") and Thresholds().outcome_gates == ()
    plan = Plan("m", "2", (5000, 10000), 30.0, thresholds=th)
    assert Plan.from_dict(plan.to_dict()) == plan
    measured = Measured(_classified(10, 1), _classified(10, 9), 30)
    assert [g.verdict for g in evaluate_outcomes(measured, th, 0.95)] == ["wait", "wait"]
