"""Per-version quality and per-group fairness: ground truth joined with the logged predictions.

The join runs over the request log's records of one model in a time window: each answered primary
(or fallback) record is matched with the truth for its id, and each shadow record with the truth
for its primary's id, so a challenger is judged on exactly the requests its champion answered.
A request's segments come from its primary record. Only single-row requests are scored (one truth
per request id); others are counted as skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.config import ModelServingConfig
from gateway.datatypes import BY_V2_NAME
from gateway.feedback.ingest import CLASSIFIER, REGRESSOR
from gateway.feedback.metrics import CalibrationBin, Rate, classification, regression
from gateway.feedback.store import FeedbackStore, Truth
from gateway.requestlog.reader import LogReader, Query
from gateway.requestlog.record import ROLE_SHADOW, Record, Tensor, id_key
from gateway.runtime import TensorSpec


def task_of(outputs: Sequence[TensorSpec], serving: ModelServingConfig) -> str:
    """A classifier when the label output (`label_output`, else the first output) holds integers."""
    chosen = next((o for o in outputs if o.name == serving.label_output), outputs[0] if outputs else None)
    return CLASSIFIER if chosen is not None and chosen.dtype.numpy.kind in "iub" else REGRESSOR


@dataclass(frozen=True)
class GroupRates:
    group: str
    n: int
    positives: int
    too_small: bool
    positive_rate: Rate
    tpr: Rate
    fpr: Rate


@dataclass
class AttributeFairness:
    attribute: str
    groups: list[GroupRates]
    unlabelled_group: int
    demographic_parity_difference: float
    equal_opportunity_difference: float
    fpr_difference: float
    alerts: list[str] = field(default_factory=list)


@dataclass
class VersionQuality:
    version: str
    role: str
    task: str
    requests: int = 0
    labelled: int = 0
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    calibration: list[CalibrationBin] = field(default_factory=list)
    fairness: list[AttributeFairness] = field(default_factory=list)


@dataclass
class _Rows:
    truth: list[float] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)
    segments: list[dict[str, str]] = field(default_factory=list)


def _tensor(outputs: list[Tensor], name: str, fallback_first: bool) -> np.ndarray | None:
    chosen = next((t for t in outputs if t.name == name), outputs[0] if fallback_first and outputs else None)
    if chosen is None or chosen.datatype not in BY_V2_NAME:
        return None
    return chosen.to_numpy(BY_V2_NAME[chosen.datatype].numpy)


def _gap(rates: list[float]) -> float:
    defined = [r for r in rates if not math.isnan(r)]
    return max(defined) - min(defined) if len(defined) >= 2 else math.nan


@dataclass(frozen=True)
class GroupCounts:
    """One group of a segment attribute: labelled requests, and how the predictions met the truth."""

    group: str
    n: int
    positives: int  # truly positive
    predicted_positive: int
    true_positives: int
    false_positives: int


def group_counts(
    values: np.ndarray, truth: np.ndarray, predicted: np.ndarray, positive_label: int
) -> list[GroupCounts]:
    """Counts per group of an attribute's `values` (one per labelled request; "" : the request had none)."""
    is_pos, said_pos = truth == positive_label, predicted == positive_label
    counts = []
    for group in sorted({v for v in values if v}):
        member = values == group
        counts.append(
            GroupCounts(
                group,
                int(member.sum()),
                int((member & is_pos).sum()),
                int((member & said_pos).sum()),
                int((member & is_pos & said_pos).sum()),
                int((member & ~is_pos & said_pos).sum()),
            )
        )
    return counts


def fairness(
    attribute: str, rows: _Rows, truth: np.ndarray, predicted: np.ndarray, serving: ModelServingConfig
) -> AttributeFairness:
    """Per-group positive rate, TPR and FPR with Wilson intervals; the gaps between groups large enough."""
    values = np.array([s.get(attribute, "") for s in rows.segments], dtype=object)
    groups = []
    for c in group_counts(values, truth, predicted, serving.positive_label):
        too_small = c.n < serving.fairness_min_group
        none = Rate(math.nan, math.nan, math.nan)
        groups.append(
            GroupRates(
                c.group,
                c.n,
                c.positives,
                too_small,
                none if too_small else Rate.wilson(c.predicted_positive, c.n),
                none if too_small else Rate.wilson(c.true_positives, c.positives),
                none if too_small else Rate.wilson(c.false_positives, c.n - c.positives),
            )
        )
    sized = [g for g in groups if not g.too_small]
    report = AttributeFairness(
        attribute,
        groups,
        int((values == "").sum()),
        _gap([g.positive_rate.value for g in sized]),
        _gap([g.tpr.value for g in sized]),
        _gap([g.fpr.value for g in sized]),
    )
    for name, gap, limit in (
        ("demographic parity difference", report.demographic_parity_difference, serving.max_demographic_parity_gap),
        ("equal opportunity difference", report.equal_opportunity_difference, serving.max_equal_opportunity_gap),
        ("false-positive rate difference", report.fpr_difference, serving.max_fpr_gap),
    ):
        if limit > 0 and not math.isnan(gap) and gap > limit:
            report.alerts.append(f"{attribute}: {name} {gap:.3f} > {limit:g}")
    return report


@dataclass(frozen=True)
class Joined:
    """One answered record of a window with its ground truth, as the quality report and a rollout's
    outcome gates see it."""

    record: Record
    truth: Truth | None  # None: no truth for this request (yet)
    predicted: float | None  # the label output's one value; None: not scorable (several rows, no output)
    score: np.ndarray | None  # the score output's row, when the model has one
    segments: dict[str, str]  # the request's, from its primary record


def joined(
    log: LogReader,
    store: FeedbackStore,
    model: str,
    serving: ModelServingConfig,
    since_ns: int | None,
    until_ns: int | None,
) -> Iterator[Joined]:
    """Every answered record of `model` in the window, in log order, with the truth of its request."""
    records: list[Record] = [r for r in log.query(Query(model=model, since_ns=since_ns, until_ns=until_ns))]
    answered = [r for r in records if r.status == 0 and r.outputs]
    segments = {r.id: r.segments or {} for r in answered if r.role != ROLE_SHADOW}
    truths = store.get_many(r.primary_id if r.role == ROLE_SHADOW and r.primary_id else r.id for r in answered)
    for record in answered:
        truth_id = record.primary_id if record.role == ROLE_SHADOW and record.primary_id else record.id
        truth = truths.get(id_key(truth_id))
        if truth is None:
            yield Joined(record, None, None, None, {})
            continue
        label = _tensor(record.outputs, serving.label_output, fallback_first=True)
        score = _tensor(record.outputs, serving.score_output, fallback_first=False) if serving.score_output else None
        if label is None or label.size != 1 or (score is not None and score.shape[0] != 1):
            yield Joined(record, truth, None, None, {})
            continue
        scores = None if score is None else score.reshape(-1)
        yield Joined(record, truth, float(label.reshape(-1)[0]), scores, segments.get(truth_id, {}))


def quality(
    log: LogReader,
    store: FeedbackStore,
    model: str,
    task: str,
    serving: ModelServingConfig,
    since_ns: int | None,
    until_ns: int | None,
) -> list[VersionQuality]:
    """Quality of every (version, role) of `model` that answered in the window, versions in order."""
    reports: dict[tuple[str, str], VersionQuality] = {}
    rows: dict[tuple[str, str], _Rows] = {}
    for one in joined(log, store, model, serving, since_ns, until_ns):
        key = (one.record.version, one.record.role)
        report = reports.get(key)
        if report is None:
            report = reports[key] = VersionQuality(one.record.version, one.record.role, task)
            rows[key] = _Rows()
        report.requests += 1
        if one.truth is None:
            continue
        if one.predicted is None:
            report.skipped += 1
            continue
        report.labelled += 1
        into = rows[key]
        into.truth.append(one.truth.truth)
        into.predicted.append(one.predicted)
        into.weight.append(one.truth.weight)
        into.segments.append(one.segments)
        if one.score is not None:
            into.probabilities.append(one.score)
    for key, report in reports.items():
        _score(report, rows[key], serving)
    return [reports[k] for k in sorted(reports, key=lambda k: (_version_key(k[0]), k[1]))]


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isascii() and version.isdigit() else (1 << 62, version)


def _score(report: VersionQuality, rows: _Rows, serving: ModelServingConfig) -> None:
    if not rows.truth:
        return
    truth, predicted, weight = np.array(rows.truth), np.array(rows.predicted), np.array(rows.weight)
    if report.task == REGRESSOR:
        report.metrics = regression(truth, predicted, weight)
        return
    widths = {p.size for p in rows.probabilities}
    probabilities = np.stack(rows.probabilities) if len(rows.probabilities) == truth.size and len(widths) == 1 else None
    truth, predicted = truth.astype(np.int64), predicted.astype(np.int64)
    report.metrics, report.calibration = classification(truth, predicted, weight, serving.positive_label, probabilities)
    report.fairness = [fairness(a, rows, truth, predicted, serving) for a in serving.segments]
