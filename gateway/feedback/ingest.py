"""Checking a batch of ground truth and storing what is valid, with a precise reason for the rest.

Each entry stands alone: a malformed entry, a wrong label type or an unknown request id is reported
(naming the entry and the field) and not stored, and changes nothing else. Unknown ids are looked
up in the request log's id index, so truth for a request the gateway never answered is refused
rather than kept where no report would ever use it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.feedback.store import KIND_LABEL, KIND_VALUE, FeedbackStore, Truth
from gateway.requestlog.reader import LogReader

CLASSIFIER = "classifier"
REGRESSOR = "regressor"


@dataclass(frozen=True)
class Invalid:
    index: int
    request_id: str
    field: str
    reason: str


@dataclass
class Outcome:
    stored: int = 0
    overwritten: int = 0
    unknown_ids: list[str] = field(default_factory=list)
    invalid: list[Invalid] = field(default_factory=list)


def _check(index: int, entry: Any, task: str, model: str, seen: dict[str, int]) -> Invalid | Truth:
    """The entry's truth, or why it cannot be stored (`entry` is a `canary.admin.v1.Feedback`)."""
    request_id = entry.request_id
    where = f"entries[{index}]"

    def invalid(name: str, reason: str) -> Invalid:
        return Invalid(
            index, request_id, f"{where}.{name}" if name else where, f"{where}{'.' if name else ''}{name}: {reason}"
        )

    if not request_id:
        return invalid("request_id", "empty; name the logged request this truth is for")
    if request_id in seen:
        return invalid(
            "request_id",
            f"{request_id!r} repeats entries[{seen[request_id]}] in this batch; send one truth per request",
        )
    kind = entry.WhichOneof("truth")
    if kind is None:
        return invalid("", "neither label nor value is set")
    if task == CLASSIFIER and kind != "label":
        return invalid(
            "value", f"model {model!r} is a classifier: send the true class as an integer `label`, not a `value`"
        )
    if task == REGRESSOR and kind != "value":
        return invalid("label", f"model {model!r} is a regressor: send the true value as `value`, not a class `label`")
    truth = float(entry.label) if kind == "label" else entry.value
    if not math.isfinite(truth):
        return invalid("value", f"{truth} is not a finite number")
    weight = entry.weight if entry.HasField("weight") else 1.0
    if not (math.isfinite(weight) and weight >= 0):
        return invalid("weight", f"{weight} is not a finite number >= 0")
    if entry.observed_ns < 0:
        return invalid("observed_ns", f"{entry.observed_ns} is negative")
    seen[request_id] = index  # only a stored entry makes a later one a repeat
    return Truth(KIND_LABEL if kind == "label" else KIND_VALUE, truth, entry.observed_ns, weight)


def submit(store: FeedbackStore, log: LogReader, model: str, task: str, entries: Sequence[Any]) -> Outcome:
    """Check every entry, look the valid ones up in the request log, store the known ones in one transaction."""
    outcome = Outcome()
    seen: dict[str, int] = {}
    valid: list[tuple[str, Truth]] = []
    for index, entry in enumerate(entries):
        checked = _check(index, entry, task, model, seen)
        if isinstance(checked, Invalid):
            outcome.invalid.append(checked)
        else:
            valid.append((entry.request_id, checked))
    known = log.known_ids(request_id for request_id, _ in valid)
    now = time.time_ns()
    chosen: list[tuple[str, Truth]] = []
    for request_id, truth in valid:
        if request_id not in known:
            outcome.unknown_ids.append(request_id)
            continue
        observed = truth.observed_ns or now
        chosen.append((request_id, Truth(truth.kind, truth.truth, observed, truth.weight, now)))
    if chosen:
        outcome.stored, outcome.overwritten = store.put(chosen)
    return outcome
