"""Outcome gates: a rollout's candidate judged against its baseline on ground truth, not only on how it
behaves. Pure functions over what a window's labelled requests add up to (`Labelled`, one per side); the
request log and the feedback store are read elsewhere (gateway.feedback.outcomes), in a worker thread.

Like router.analysis's gates, each returns `pass`, `fail` or `wait`, and fails only on evidence: the
candidate must be worse than the baseline by more than the plan's margin at the look's confidence. Every
outcome gate waits until both sides have `min_labelled` labelled requests in the window.

- **accuracy** (classifiers): fails when the upper one-sided bound of accuracy(candidate) -
  accuracy(baseline) is below -`accuracy_not_worse_by`. The bound is Newcombe's hybrid score interval of
  a difference of two independent proportions (router.analysis.newcombe_bounds), good near 100% and on
  small samples, where a Wald interval is not. In the shadow phase both sides answered the same requests;
  treating them as independent makes the bound wider (positively correlated answers), so it fails later,
  never sooner.
- **mae** (regressors): fails when the lower one-sided bound of MAE(candidate) - MAE(baseline) is above
  `mae_not_worse_by`: a mean difference with Welch's standard error and a normal quantile (at
  `min_labelled` of 30 or more per side the t quantile is within a few percent of it).
- **equal_opportunity** (classifiers): the gap is max - min of the true-positive rate over the groups of
  `fairness_attribute` with at least the model's `fairness_min_group` labelled requests and one positive
  (the gap the quality report shows). Fails when even the lower bound of the candidate's gap (its two
  extreme groups) exceeds the upper bound of the baseline's (the largest over its pairs of groups) by more
  than `max_equal_opportunity_gap_increase`. Each bound is a Newcombe bound at 1 - (1 - confidence) / 2,
  so both hold together at `confidence` (Bonferroni). It waits while either side has fewer than two
  groups large enough.

Counts are of requests, unweighted (the feedback's weights are for the quality report's figures): the
tests are about how many requests the evidence rests on.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Protocol

from router.analysis import GateResult, Thresholds, Verdict, newcombe_bounds


@dataclass(frozen=True)
class Group:
    """One group of the fairness attribute on one side: labelled requests, true positives among them."""

    name: str
    n: int
    positives: int
    true_positives: int


@dataclass(frozen=True)
class Labelled:
    """One side's labelled requests over a window, summed for the outcome gates."""

    n: int = 0  # scorable requests with ground truth
    correct: int = 0  # classifiers: predicted class == true class
    mae: float = math.nan  # regressors: mean absolute error...
    abs_error_var: float = math.nan  # ...and the sample variance of the absolute errors
    groups: tuple[Group, ...] = ()  # classifiers with a fairness attribute: its groups


@dataclass(frozen=True)
class Measured:
    """Both sides of one window, and the model's smallest group a TPR is shown for (`fairness_min_group`)."""

    candidate: Labelled
    baseline: Labelled
    min_group: int


@dataclass(frozen=True)
class OutcomeQuery:
    """What to measure: the model's labelled requests between `since_ns` and `until_ns` (log time)."""

    model: str
    candidate: str
    baseline: str
    candidate_roles: tuple[str, ...]  # the candidate's records that count: its answers, its shadow calls
    attribute: str  # the fairness attribute's groups to count ("" : none)
    since_ns: int
    until_ns: int


class OutcomeSource(Protocol):
    """Ground truth joined with predictions (gateway.feedback.outcomes.FeedbackOutcomes)."""

    def check(self, model: str, thresholds: Thresholds) -> None:
        """Raise InvalidArgument (naming the field) when the model cannot be judged by these gates."""

    def measure(self, query: OutcomeQuery) -> Measured:
        """Both sides over the query's window. Reads LMDB: call it from a worker thread."""


def accuracy_gate(candidate: Labelled, baseline: Labelled, th: Thresholds, confidence: float) -> GateResult:
    """Fail when the candidate's accuracy is lower by more than the margin, at `confidence` (both sides
    have labelled requests: evaluate_outcomes waits for `min_labelled` first)."""
    margin = th.accuracy_not_worse_by or 0.0
    ac, ab = candidate.correct / candidate.n, baseline.correct / baseline.n
    _, upper = newcombe_bounds(candidate.correct, candidate.n, baseline.correct, baseline.n, confidence)
    figures = {
        "candidate_accuracy": ac,
        "baseline_accuracy": ab,
        "candidate_n": candidate.n,
        "baseline_n": baseline.n,
        "difference": ac - ab,
        "upper_bound": upper,
        "margin": margin,
        "confidence": confidence,
    }
    summary = (
        f"accuracy {ac:.2%} ({candidate.correct}/{candidate.n}) vs {ab:.2%} ({baseline.correct}/{baseline.n}): "
        f"{(ac - ab) * 100:+.2f} pp, at most {upper * 100:+.2f} pp at {confidence * 100:g}% "
        f"(worse if below {-margin * 100:+.2f} pp)"
    )
    return GateResult("accuracy", "fail" if upper < -margin else "pass", summary, figures)


def mean_difference_lower(
    mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int, confidence: float
) -> float:
    """One-sided lower bound of mean1 - mean2 for independent samples: Welch's standard error, normal quantile."""
    se = math.sqrt(var1 / n1 + var2 / n2)
    return mean1 - mean2 - NormalDist().inv_cdf(confidence) * se


def mae_gate(candidate: Labelled, baseline: Labelled, th: Thresholds, confidence: float) -> GateResult:
    """Fail when the candidate's MAE is higher by more than the margin, at `confidence` (as accuracy_gate)."""
    margin = th.mae_not_worse_by or 0.0
    if candidate.n < 2 or baseline.n < 2:  # no spread to judge from
        return GateResult(
            "mae", "wait", f"labelled requests: candidate {candidate.n}, baseline {baseline.n}; need 2 each", {}
        )
    lower = mean_difference_lower(
        candidate.mae,
        candidate.abs_error_var,
        candidate.n,
        baseline.mae,
        baseline.abs_error_var,
        baseline.n,
        confidence,
    )
    figures = {
        "candidate_mae": candidate.mae,
        "baseline_mae": baseline.mae,
        "candidate_n": candidate.n,
        "baseline_n": baseline.n,
        "difference": candidate.mae - baseline.mae,
        "lower_bound": lower,
        "margin": margin,
        "confidence": confidence,
    }
    summary = (
        f"MAE {candidate.mae:.4g} (n={candidate.n}) vs {baseline.mae:.4g} (n={baseline.n}): "
        f"{candidate.mae - baseline.mae:+.4g}, at least {lower:+.4g} at {confidence * 100:g}% "
        f"(worse if above +{margin:g})"
    )
    # A NaN bound (a non-finite prediction, or one labelled request) is no evidence of "not worse".
    verdict: Verdict = "pass" if lower <= margin else "fail"
    return GateResult("mae", verdict, summary, figures)


def _sized(side: Labelled, min_group: int) -> list[Group]:
    return [g for g in side.groups if g.n >= min_group and g.positives > 0]


def _tpr(group: Group) -> float:
    return group.true_positives / group.positives


def equal_opportunity_gate(
    candidate: Labelled, baseline: Labelled, th: Thresholds, confidence: float, min_group: int
) -> GateResult:
    """Fail when the candidate's TPR gap between groups is wider than the baseline's by more than the margin;
    wait while either side has fewer than two groups large enough."""
    attribute, margin = th.fairness_attribute, th.max_equal_opportunity_gap_increase or 0.0
    # Only groups large enough on both sides: a group counted on one side only would widen that gap alone.
    both = {g.name for g in _sized(candidate, min_group)} & {g.name for g in _sized(baseline, min_group)}
    sized_c = [g for g in _sized(candidate, min_group) if g.name in both]
    sized_b = [g for g in _sized(baseline, min_group) if g.name in both]
    if len(sized_c) < 2 or len(sized_b) < 2:
        return GateResult(
            "equal_opportunity",
            "wait",
            f"{attribute}: groups with >= {min_group} labelled requests and a positive: "
            f"candidate {len(sized_c)}, baseline {len(sized_b)}; need 2 each",
            {"candidate_groups": len(sized_c), "baseline_groups": len(sized_b), "min_group": min_group},
        )
    each = 1 - (1 - confidence) / 2  # two bounds that must hold together
    high_c, low_c = max(sized_c, key=_tpr), min(sized_c, key=_tpr)
    gap_c = _tpr(high_c) - _tpr(low_c)
    gap_c_low = newcombe_bounds(high_c.true_positives, high_c.positives, low_c.true_positives, low_c.positives, each)[0]
    gap_b = max(_tpr(g) for g in sized_b) - min(_tpr(g) for g in sized_b)
    gap_b_high = max(
        newcombe_bounds(a.true_positives, a.positives, b.true_positives, b.positives, each)[1]
        for a, b in itertools.permutations(sized_b, 2)
    )
    verdict: Verdict = "fail" if gap_c_low - gap_b_high > margin else "pass"
    figures = {
        "candidate_gap": gap_c,
        "baseline_gap": gap_b,
        "increase": gap_c - gap_b,
        "candidate_gap_low": gap_c_low,
        "baseline_gap_high": gap_b_high,
        "margin": margin,
        "confidence": confidence,
        "candidate_n": candidate.n,
        "baseline_n": baseline.n,
    }
    summary = (
        f"{attribute}: TPR gap {gap_c:.3f} ({high_c.name} {_tpr(high_c):.2f} vs {low_c.name} {_tpr(low_c):.2f}) "
        f"vs {gap_b:.3f}; at least {gap_c_low:.3f} vs at most {gap_b_high:.3f} at {confidence * 100:g}% "
        f"(worse if wider by more than {margin:g})"
    )
    return GateResult("equal_opportunity", verdict, summary, figures)


def evaluate_outcomes(measured: Measured, th: Thresholds, confidence: float) -> list[GateResult]:
    """Every outcome gate the thresholds ask for, at `confidence` (the caller picks final or interim); each
    waits until both sides have `min_labelled` labelled requests."""
    candidate, baseline, min_group = measured.candidate, measured.baseline, measured.min_group
    if candidate.n < th.min_labelled or baseline.n < th.min_labelled:
        return [
            GateResult(
                gate,
                "wait",
                f"labelled requests: candidate {candidate.n}, baseline {baseline.n}; need {th.min_labelled} each",
                {"candidate_n": candidate.n, "baseline_n": baseline.n, "min_labelled": th.min_labelled},
            )
            for gate in th.outcome_gates
        ]
    results = []
    for gate in th.outcome_gates:
        if gate == "accuracy":
            results.append(accuracy_gate(candidate, baseline, th, confidence))
        elif gate == "mae":
            results.append(mae_gate(candidate, baseline, th, confidence))
        else:
            results.append(equal_opportunity_gate(candidate, baseline, th, confidence, min_group))
    return results


def not_measured(th: Thresholds, why: str) -> list[GateResult]:
    """The outcome gates, waiting: no figures for this window yet (or reading them failed)."""
    return [GateResult(gate, "wait", why, {}) for gate in th.outcome_gates]
