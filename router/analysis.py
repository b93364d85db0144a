"""Canary analysis: pure functions that judge a candidate against its baseline over one step's window.

Each gate returns a verdict, `pass`, `fail` or `wait` (too little data to decide), with the figures that
decided it. No I/O: the rollout state machine (router.rollout) measures the window and acts on verdicts.

**Which test decides "worse".** Error and OOD rates are compared with a one-sided **Fisher exact test**
(H0: the candidate's rate is no higher than the baseline's), at 95% confidence by default. We chose it
over a two-proportion z-test because canary windows are small on the candidate's side and the rates are
near zero, exactly where the z-test's normal approximation fails: with 0/200 baseline errors the z-test
calls a single candidate error in 30 requests significant (z = 2.6), while Fisher says p = 0.13. A rate
fails only when it is both significantly higher *and* higher by more than the gate's allowed margin, so
a real but negligible difference on a large window does not roll a candidate back.

Agreement (shadow vs primary) fails when the **Wilson score** upper confidence bound of the agreement
rate is below the threshold (we are confident it is too low), passes when the observed rate reaches the
threshold, and waits in between.

Latency: the candidate's p99 must not exceed a limit, `max_p99_ratio` x the baseline's p99 (or the
baseline's p99 + `p99_slack_ms`, whichever is larger: sub-millisecond p99s jitter by more than 50% on a
busy machine). Comparing two p99 estimates of a few dozen samples each compares two maxima, which is
noise; instead a one-sided **binomial test** asks whether significantly more than 1% of the candidate's
answers are slower than the limit (H0: its p99 is within the limit, so at most 1% are slower). The
baseline's p99 is taken as known, so its window should hold a few hundred requests (it usually holds
far more than the candidate's). Only answered requests count: failures are the error gate's.

**Interim looks.** The state machine checks the window several times a second, so a bad candidate is
rolled back as soon as the data suffices rather than at the end of the step. Looking repeatedly inflates
the false-alarm rate, so interim looks use a stricter confidence (99.9% by default; a Haybittle-Peto
style boundary) and only a `fail` acts on them; the step's final look at its end uses the nominal
confidence. A false alarm rolls back a healthy candidate, which is the safe direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

from gateway.errors import InvalidArgument
from gateway.stats import Counts

Verdict = Literal["pass", "fail", "wait"]
GateName = Literal["errors", "p99_latency", "ood", "agreement", "accuracy", "mae", "equal_opportunity"]


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must meet at each step. Every decision needs `min_requests` per side."""

    min_requests: int = 200
    confidence: float = 0.95
    interim_confidence: float = 0.999
    max_error_rate_delta: float = 0.01  # the candidate may err this much more (absolute), if significant
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 1.0  # p99s closer than this pass whatever their ratio
    max_ood_rate_delta: float = 0.05
    min_agreement: float = 0.95
    # Outcome gates (router.outcomes), judged on ground truth; each is off while None.
    min_labelled: int = 100  # labelled requests per side before an outcome gate decides
    accuracy_not_worse_by: float | None = None  # classifiers: absolute accuracy the candidate may lose
    mae_not_worse_by: float | None = None  # regressors: MAE the candidate may add, in the target's units
    max_equal_opportunity_gap_increase: float | None = None  # of `fairness_attribute`'s TPR gap
    fairness_attribute: str | None = None  # a segment attribute the model declares

    def __post_init__(self) -> None:
        if not isinstance(self.min_requests, int) or self.min_requests < 1:
            raise InvalidArgument(f"min_requests: {self.min_requests!r}; at least 1 request per side")
        for name in ("confidence", "interim_confidence"):
            value = getattr(self, name)
            if not 0.5 <= value < 1:
                raise InvalidArgument(f"{name}: {value!r} must be in [0.5, 1)")
        for name in ("max_error_rate_delta", "max_ood_rate_delta", "min_agreement"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidArgument(f"{name}: {getattr(self, name)!r} must be in [0, 1]")
        # Finite: an infinite limit would switch the latency gate off without saying so.
        if not 0 <= self.p99_slack_ms < math.inf:
            raise InvalidArgument(f"p99_slack_ms: {self.p99_slack_ms!r} must be a finite number >= 0")
        if not 1 <= self.max_p99_ratio < math.inf:
            raise InvalidArgument(
                f"max_p99_ratio: {self.max_p99_ratio!r} must be finite and at least 1 (below 1 fails equal latencies)"
            )
        if not isinstance(self.min_labelled, int) or self.min_labelled < 1:
            raise InvalidArgument(f"min_labelled: {self.min_labelled!r}; at least 1 labelled request per side")
        for name in ("accuracy_not_worse_by", "max_equal_opportunity_gap_increase"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise InvalidArgument(f"{name}: {value!r} must be in [0, 1] (an absolute difference of rates)")
        if self.mae_not_worse_by is not None and not 0 <= self.mae_not_worse_by < math.inf:
            raise InvalidArgument(f"mae_not_worse_by: {self.mae_not_worse_by!r} must be a finite number >= 0")
        if (self.max_equal_opportunity_gap_increase is None) != (not self.fairness_attribute):
            raise InvalidArgument(
                f"fairness_attribute: {self.fairness_attribute!r}; the equal-opportunity gate needs both "
                "max_equal_opportunity_gap_increase and the segment attribute whose groups it compares"
            )
        if self.accuracy_not_worse_by is not None and self.mae_not_worse_by is not None:
            raise InvalidArgument("mae_not_worse_by: a model is a classifier (accuracy) or a regressor (MAE), not both")

    @property
    def outcome_gates(self) -> tuple[GateName, ...]:
        """The outcome gates this plan asks for, in the order they are shown."""
        chosen: list[GateName] = []
        if self.accuracy_not_worse_by is not None:
            chosen.append("accuracy")
        if self.mae_not_worse_by is not None:
            chosen.append("mae")
        if self.max_equal_opportunity_gap_increase is not None:
            chosen.append("equal_opportunity")
        return tuple(chosen)


@dataclass(frozen=True)
class Agreement:
    """Shadow comparisons over the window: the candidate's output against the baseline's, same input."""

    compared: int
    agreed: int


@dataclass(frozen=True)
class GateResult:
    gate: GateName
    verdict: Verdict
    summary: str  # one line for humans and the change log
    figures: dict[str, float] = field(default_factory=dict)


def fisher_greater(x_candidate: int, n_candidate: int, x_baseline: int, n_baseline: int) -> float:
    """One-sided Fisher exact p-value that the candidate's rate exceeds the baseline's.

    P(X >= x_candidate) for X hypergeometric: n_candidate draws from n_candidate + n_baseline requests of
    which x_candidate + x_baseline are events. Summed in log space, so large windows do not overflow.
    """
    total, events = n_candidate + n_baseline, x_candidate + x_baseline
    if x_candidate == 0 or events == 0:
        return 1.0

    def log_comb(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    denominator = log_comb(total, n_candidate)
    p = 0.0
    for k in range(x_candidate, min(events, n_candidate) + 1):
        term = math.exp(log_comb(events, k) + log_comb(total - events, n_candidate - k) - denominator)
        p += term
        if term < 1e-17 * p:  # the tail decreases past the mode; the rest cannot matter
            break
    return min(p, 1.0)


def wilson_bounds(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds of a proportion: each holds at `confidence` on its own (together they
    are the two-sided interval at 2 * confidence - 1)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(confidence)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def wilson_upper(successes: int, n: int, confidence: float) -> float:
    """One-sided Wilson score upper bound of a proportion."""
    return wilson_bounds(successes, n, confidence)[1]


def newcombe_bounds(x1: int, n1: int, x2: int, n2: int, confidence: float) -> tuple[float, float]:
    """One-sided bounds of the difference of two independent proportions x1/n1 - x2/n2, each at
    `confidence`: Newcombe's hybrid score interval (1998, method 10), built from the Wilson bounds of
    each proportion. Unlike the Wald interval it stays inside [-1, 1] and keeps its coverage near 0 and 1
    and on small samples, where accuracies and true-positive rates live."""
    p1, p2 = x1 / n1, x2 / n2
    low1, high1 = wilson_bounds(x1, n1, confidence)
    low2, high2 = wilson_bounds(x2, n2, confidence)
    d = p1 - p2
    lower = d - math.sqrt((p1 - low1) ** 2 + (high2 - p2) ** 2)
    upper = d + math.sqrt((high1 - p1) ** 2 + (p2 - low2) ** 2)
    return max(-1.0, lower), min(1.0, upper)


def binomial_greater(k: int, n: int, p: float) -> float:
    """One-sided binomial p-value P(X >= k) for X ~ Binomial(n, p), summed in log space."""
    if k <= 0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(k, n + 1):
        term = math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        total += term
        if term < 1e-17 * total:
            break
    return min(total, 1.0)


def _rate(x: int, n: int) -> str:
    return f"{x / n:.2%} ({x}/{n})" if n else "- (0/0)"


def _enough(gate: GateName, candidate: int, baseline: int, th: Thresholds, what: str) -> GateResult | None:
    if candidate >= th.min_requests and baseline >= th.min_requests:
        return None
    return GateResult(
        gate,
        "wait",
        f"{what}: candidate {candidate}, baseline {baseline}; need {th.min_requests} each",
        {"candidate_n": candidate, "baseline_n": baseline, "min_requests": th.min_requests},
    )


def _rate_gate(
    gate: GateName, label: str, xc: int, nc: int, xb: int, nb: int, delta: float, confidence: float
) -> GateResult:
    rc, rb = xc / nc, xb / nb
    p_value = fisher_greater(xc, nc, xb, nb)
    worse = p_value < 1 - confidence and rc - rb > delta
    figures = {
        "candidate_rate": rc,
        "baseline_rate": rb,
        "candidate_n": nc,
        "baseline_n": nb,
        "candidate_events": xc,
        "baseline_events": xb,
        "p_value": p_value,
        "max_delta": delta,
        "confidence": confidence,
    }
    summary = (
        f"{label} {_rate(xc, nc)} vs {_rate(xb, nb)}, Fisher p={p_value:.2g} "
        f"(worse if p<{1 - confidence:.3g} and +{(rc - rb) * 100:.2f} pp > +{delta * 100:.2f} pp)"
    )
    return GateResult(gate, "fail" if worse else "pass", summary, figures)


def error_gate(candidate: Counts, baseline: Counts, th: Thresholds, confidence: float) -> GateResult:
    """Fail when the candidate's error rate is significantly higher, by more than the allowed margin."""
    waiting = _enough("errors", candidate.requests, baseline.requests, th, "requests")
    if waiting is not None:
        return waiting
    return _rate_gate(
        "errors",
        "error rate",
        candidate.errors,
        candidate.requests,
        baseline.errors,
        baseline.requests,
        th.max_error_rate_delta,
        confidence,
    )


def ood_gate(candidate: Counts, baseline: Counts, th: Thresholds, confidence: float) -> GateResult:
    """Like the error gate, on the share of scored requests flagged out of distribution.

    A version without an OOD profile scores nothing: once both sides have enough requests and one of
    them scored none, there is nothing to compare and the gate passes, saying why.
    """
    waiting = _enough("ood", candidate.requests, baseline.requests, th, "requests")
    if waiting is not None:
        return waiting
    if candidate.ood_scored == 0 or baseline.ood_scored == 0:
        unscored = "candidate" if candidate.ood_scored == 0 else "baseline"
        return GateResult("ood", "pass", f"not compared: the {unscored} scores no request (no OOD profile)", {})
    waiting = _enough("ood", candidate.ood_scored, baseline.ood_scored, th, "scored requests")
    if waiting is not None:
        return waiting
    return _rate_gate(
        "ood",
        "OOD rate",
        candidate.ood_flagged,
        candidate.ood_scored,
        baseline.ood_flagged,
        baseline.ood_scored,
        th.max_ood_rate_delta,
        confidence,
    )


def latency_gate(candidate: Counts, baseline: Counts, th: Thresholds, confidence: float) -> GateResult:
    """Fail when significantly more than 1% of the candidate's answers are slower than the limit."""
    answered_c, answered_b = candidate.requests - candidate.errors, baseline.requests - baseline.errors
    waiting = _enough("p99_latency", answered_c, answered_b, th, "answered requests")
    if waiting is not None:
        return waiting
    p99_c, p99_b = candidate.latency_quantile_ms(0.99), baseline.latency_quantile_ms(0.99)
    limit = max(p99_b * th.max_p99_ratio, p99_b + th.p99_slack_ms)
    slower = candidate.answered_slower_than_ms(limit)
    p_value = binomial_greater(slower, answered_c, 0.01)
    figures = {
        "candidate_p99_ms": p99_c,
        "baseline_p99_ms": p99_b,
        "ratio": p99_c / p99_b if p99_b > 0 else math.inf,
        "limit_ms": limit,
        "slower": slower,
        "candidate_n": answered_c,
        "baseline_n": answered_b,
        "p_value": p_value,
        "max_ratio": th.max_p99_ratio,
        "slack_ms": th.p99_slack_ms,
        "confidence": confidence,
    }
    summary = (
        f"p99 {p99_c:.2f} ms vs {p99_b:.2f} ms ({figures['ratio']:.2f}x); {slower}/{answered_c} answers over "
        f"the {limit:.2f} ms limit, binomial p={p_value:.2g} (worse if p<{1 - confidence:.3g}: over 1% above it)"
    )
    return GateResult("p99_latency", "fail" if p_value < 1 - confidence else "pass", summary, figures)


def agreement_gate(agreement: Agreement, th: Thresholds, confidence: float) -> GateResult:
    """Fail when we are confident the shadow agreement is below the threshold; pass when it reaches it."""
    if agreement.compared < th.min_requests:
        return GateResult(
            "agreement",
            "wait",
            f"shadow comparisons: {agreement.compared}; need {th.min_requests}",
            {"compared": agreement.compared, "min_requests": th.min_requests},
        )
    rate = agreement.agreed / agreement.compared
    upper = wilson_upper(agreement.agreed, agreement.compared, confidence)
    verdict: Verdict = "fail" if upper < th.min_agreement else "pass" if rate >= th.min_agreement else "wait"
    figures = {
        "rate": rate,
        "upper_bound": upper,
        "compared": agreement.compared,
        "agreed": agreement.agreed,
        "min_agreement": th.min_agreement,
        "confidence": confidence,
    }
    summary = (
        f"agreement {_rate(agreement.agreed, agreement.compared)}, upper bound {upper:.2%} (min {th.min_agreement:.2%})"
    )
    return GateResult("agreement", verdict, summary, figures)


def evaluate(
    candidate: Counts,
    baseline: Counts,
    agreement: Agreement | None,
    th: Thresholds,
    *,
    final: bool,
    gates: Sequence[GateName] = ("errors", "p99_latency", "ood", "agreement"),
) -> list[GateResult]:
    """Every gate in `gates` over one window; `final` looks use the nominal confidence, interim the strict one.

    The agreement gate is judged only when `agreement` is given (the candidate is being shadowed).
    """
    confidence = th.confidence if final else th.interim_confidence
    results = []
    for gate in gates:
        if gate == "errors":
            results.append(error_gate(candidate, baseline, th, confidence))
        elif gate == "p99_latency":
            results.append(latency_gate(candidate, baseline, th, confidence))
        elif gate == "ood":
            results.append(ood_gate(candidate, baseline, th, confidence))
        elif agreement is not None:
            results.append(agreement_gate(agreement, th, confidence))
    return results


def overall(results: Sequence[GateResult]) -> Verdict:
    """Any fail fails; otherwise any wait waits; otherwise pass."""
    verdicts = {r.verdict for r in results}
    return "fail" if "fail" in verdicts else "wait" if "wait" in verdicts else "pass"


def explain(results: Sequence[GateResult]) -> str:
    """The gates in one line, failing ones first: what a change-log reason carries."""
    ordered = sorted(results, key=lambda r: ("fail", "wait", "pass").index(r.verdict))
    return "; ".join(f"{r.gate} {r.verdict.upper()}: {r.summary}" for r in ordered)
