"""Ground truth for a rollout's outcome gates: the candidate's and the baseline's labelled requests of one
window, summed for router.outcomes to judge. `measure` reads the request log and the feedback store (LMDB),
so the rollout manager calls it from its worker thread, never on the event loop.

The candidate counts on every record it made in the window in the roles the query names (in steps: its
answers and its shadow calls on the baseline's share; in the shadow phase: its shadow calls); the
baseline on its answers. A shadow call is judged with its primary's truth, as in the quality report.
"""

from __future__ import annotations

import math

import numpy as np

from gateway.config import ModelServingConfig
from gateway.errors import FailedPrecondition, InvalidArgument
from gateway.feedback.ingest import REGRESSOR
from gateway.feedback.quality import group_counts, joined, task_of
from gateway.feedback.store import FeedbackStore
from gateway.repository import ModelRepository
from gateway.requestlog.reader import LogReader
from gateway.requestlog.record import ROLE_PRIMARY
from router.analysis import Thresholds
from router.outcomes import Group, Labelled, Measured, OutcomeQuery


class _Side:
    def __init__(self) -> None:
        self.truth: list[float] = []
        self.predicted: list[float] = []
        self.groups: list[str] = []

    def summed(self, task: str, attribute: str, serving: ModelServingConfig) -> Labelled:
        truth, predicted = np.array(self.truth), np.array(self.predicted)
        n = int(truth.size)
        if task == REGRESSOR:
            errors = np.abs(predicted - truth)
            mae = float(errors.mean()) if n else math.nan
            return Labelled(n, mae=mae, abs_error_var=float(errors.var(ddof=1)) if n > 1 else math.nan)
        truth, predicted = truth.astype(np.int64), predicted.astype(np.int64)
        groups: tuple[Group, ...] = ()
        if attribute:
            values = np.array(self.groups, dtype=object)
            counts = group_counts(values, truth, predicted, serving.positive_label)
            groups = tuple(Group(c.group, c.n, c.positives, c.true_positives) for c in counts)
        return Labelled(n, correct=int((truth == predicted).sum()), groups=groups)


class FeedbackOutcomes:
    """The rollout manager's OutcomeSource: the request log joined with the feedback store."""

    def __init__(self, log: LogReader, store: FeedbackStore | None, repository: ModelRepository) -> None:
        self._log = log
        self._store = store
        self._repository = repository

    def _task(self, model: str) -> str:
        loaded = [v.model for v in self._repository.versions_of(model).values() if v.model is not None]
        if not loaded:
            raise FailedPrecondition(f"model: {model!r} has no loaded version to tell classifier from regressor")
        return task_of(loaded[-1].outputs, self._repository.serving(model))

    def check(self, model: str, thresholds: Thresholds) -> None:
        """Refuse outcome gates the model cannot be judged by (the request names the field)."""
        if not thresholds.outcome_gates:
            return
        if self._store is None:
            raise FailedPrecondition(
                "gates: outcome gates judge ground truth, and this gateway runs without a request log to join it with"
            )
        task = self._task(model)
        if task == REGRESSOR:
            for name in ("accuracy_not_worse_by", "max_equal_opportunity_gap_increase"):
                if getattr(thresholds, name) is not None:
                    raise InvalidArgument(
                        f"{name}: model {model!r} is a regressor (no classes); judge it with mae_not_worse_by"
                    )
        elif thresholds.mae_not_worse_by is not None:
            raise InvalidArgument(
                f"mae_not_worse_by: model {model!r} is a classifier; judge it with accuracy_not_worse_by"
            )
        declared = self._repository.serving(model).segments
        if thresholds.fairness_attribute and thresholds.fairness_attribute not in declared:
            raise InvalidArgument(
                f"fairness_attribute: {thresholds.fairness_attribute!r} is not a segment attribute of model "
                f"{model!r} (it declares {', '.join(declared) or 'none'}; see `segments` in the configuration)"
            )

    def measure(self, query: OutcomeQuery) -> Measured:
        """Both sides' labelled requests logged in the query's window, with truth received by now."""
        assert self._store is not None  # check() refused the rollout otherwise
        serving = self._repository.serving(query.model)
        task = self._task(query.model)
        candidate, baseline = _Side(), _Side()
        for one in joined(self._log, self._store, query.model, serving, query.since_ns, query.until_ns):
            record = one.record
            if one.truth is None or one.predicted is None:
                continue
            if record.version == query.candidate and record.role in query.candidate_roles:
                side = candidate
            elif record.version == query.baseline and record.role == ROLE_PRIMARY:
                side = baseline
            else:
                continue
            side.truth.append(one.truth.truth)
            side.predicted.append(one.predicted)
            side.groups.append(one.segments.get(query.attribute, "") if query.attribute else "")
        return Measured(
            candidate.summed(task, query.attribute, serving),
            baseline.summed(task, query.attribute, serving),
            serving.fairness_min_group,
        )
