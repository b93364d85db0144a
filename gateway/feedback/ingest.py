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

import numpy as np

from gateway.errors import InvalidArgument
from gateway.feedback.store import KIND_LABEL, KIND_VALUE, RECORD, FeedbackStore, Truth
from gateway.requestlog.reader import LogReader
from gateway.requestlog.record import MAX_ID_KEY_BYTES, id_key

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


@dataclass
class _Rows:
    """Valid truth so far, as columns (entries are appended row by row, columns in one go)."""

    ids: list[str] = field(default_factory=list)
    kinds: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)
    observed: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)

    def add(
        self, ids: list[str], kind: np.ndarray, truth: np.ndarray, observed: np.ndarray, weight: np.ndarray
    ) -> None:
        self.ids += ids
        self.kinds.append(kind)
        self.truths.append(truth)
        self.observed.append(observed)
        self.weights.append(weight)


def _columns(
    columns: Any, offset: int, task: str, model: str, seen: dict[str, int], outcome: Outcome, rows: _Rows
) -> None:
    """Check a FeedbackColumns message with array operations; bad rows become Invalid, the rest join `rows`."""
    ids = list(columns.request_ids)
    n = len(ids)
    if not n:
        if len(columns.labels) or len(columns.values):
            raise InvalidArgument("columns.request_ids: empty, but labels or values were sent")
        return
    if len(columns.labels) and len(columns.values):
        raise InvalidArgument("columns: send labels (classifiers) or values (regressors), not both")
    kind_name = "labels" if len(columns.labels) else "values"
    wanted = "labels" if task == CLASSIFIER else "values"
    if kind_name != wanted:
        what = "the true class as integer `labels`" if task == CLASSIFIER else "the true value as `values`"
        raise InvalidArgument(f"columns.{kind_name}: model {model!r} is a {task}: send {what}")
    lengths = {"labels" if task == CLASSIFIER else "values": len(getattr(columns, wanted))}
    lengths.update(observed_ns=len(columns.observed_ns), weights=len(columns.weights))
    for name, length in lengths.items():
        if length not in (0, n) or (name == wanted and length != n):
            raise InvalidArgument(
                f"columns.{name}: {length} rows for {n} request_ids; send one per request id (or none)"
            )
    truth = np.array(getattr(columns, wanted), dtype=np.float64)
    observed = np.array(columns.observed_ns, dtype=np.int64) if len(columns.observed_ns) else np.zeros(n, np.int64)
    weight = np.array(columns.weights, dtype=np.float64) if len(columns.weights) else np.ones(n)
    bad = ~np.isfinite(truth) | ~np.isfinite(weight) | (weight < 0) | (observed < 0)
    # The common case needs no Python loop, and nothing after the columns reads `seen`.
    if "" in ids or len(set(ids)) < n or not seen.keys().isdisjoint(ids):
        for r, i in enumerate(ids):  # only a valid row makes a later one a repeat
            if not bad[r] and (not i or seen.setdefault(i, offset + r) != offset + r):
                bad[r] = True
    kind = np.full(n, KIND_LABEL if task == CLASSIFIER else KIND_VALUE, np.uint8)
    if bad.any():
        for r in np.flatnonzero(bad).tolist():
            outcome.invalid.append(_column_invalid(ids, r, offset, truth, weight, observed, wanted, seen))
        keep = ~bad
        rows.add(
            [i for i, k in zip(ids, keep, strict=True) if k], kind[keep], truth[keep], observed[keep], weight[keep]
        )
    else:
        rows.add(ids, kind, truth, observed, weight)


def _column_invalid(
    ids: list[str],
    r: int,
    offset: int,
    truth: np.ndarray,
    weight: np.ndarray,
    observed: np.ndarray,
    wanted: str,
    seen: dict[str, int],
) -> Invalid:
    request_id = ids[r]
    if not np.isfinite(truth[r]):
        name, reason = f"{wanted}[{r}]", f"{truth[r]} is not a finite number"
    elif not (np.isfinite(weight[r]) and weight[r] >= 0):
        name, reason = f"weights[{r}]", f"{weight[r]} is not a finite number >= 0"
    elif observed[r] < 0:
        name, reason = f"observed_ns[{r}]", f"{observed[r]} is negative"
    elif not request_id:
        name, reason = f"request_ids[{r}]", "empty; name the logged request this truth is for"
    else:
        first = seen[request_id]  # an index over entries, then column rows (offset by the entries)
        earlier = f"entries[{first}]" if first < offset else f"row {first - offset}"
        name, reason = (
            f"request_ids[{r}]",
            f"{request_id!r} repeats {earlier} in this batch; send one truth per request",
        )
    return Invalid(offset + r, request_id, f"columns.{name}", f"columns.{name}: {reason}")


def submit(
    store: FeedbackStore, log: LogReader, model: str, task: str, entries: Sequence[Any], columns: Any = None
) -> Outcome:
    """Check every entry (and column row), look the valid ones up in the request log, store the known
    ones in one transaction. Columns that do not fit together raise InvalidArgument: nothing is stored."""
    outcome = Outcome()
    seen: dict[str, int] = {}
    rows = _Rows()
    for index, entry in enumerate(entries):
        checked = _check(index, entry, task, model, seen)
        if isinstance(checked, Invalid):
            outcome.invalid.append(checked)
        else:
            one = np.ones(1)
            rows.add(
                [entry.request_id],
                np.array([checked.kind], np.uint8),
                one * checked.truth,
                np.array([checked.observed_ns], np.int64),
                one * checked.weight,
            )
    if columns is not None:
        _columns(columns, len(entries), task, model, seen, outcome, rows)
    if not rows.ids:
        return outcome
    keys = [i.encode() for i in rows.ids]
    if max(map(len, keys)) > MAX_ID_KEY_BYTES:
        keys = [id_key(i) for i in rows.ids]
    now = time.time_ns()
    packed = np.empty(len(keys), RECORD)
    packed["kind"] = np.concatenate(rows.kinds)
    packed["truth"] = np.concatenate(rows.truths)
    observed = np.concatenate(rows.observed)
    packed["observed_ns"] = np.where(observed == 0, now, observed)
    packed["weight"] = np.concatenate(rows.weights)
    packed["received_ns"] = now
    # Keys are distinct (repeats were refused). Sorted once here, so the log lookup and the write visit
    # B-tree pages in order (their own sorts then find sorted input: linear); sorting (key, value) pairs
    # instead costs twice as much as keys alone.
    value_of = dict(zip(keys, packed.view(f"V{RECORD.itemsize}").tolist(), strict=True))  # bytes per row, in C
    in_order = sorted(value_of)
    known = log.known_keys(in_order)
    if len(known) == len(keys):
        pairs = [(key, value_of[key]) for key in in_order]
    else:
        outcome.unknown_ids = [i for i, key in zip(rows.ids, keys, strict=True) if key not in known]
        pairs = [(key, value_of[key]) for key in in_order if key in known]
    if pairs:
        outcome.stored, outcome.overwritten = store.put_packed(pairs)
    return outcome
