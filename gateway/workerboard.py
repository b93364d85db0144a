"""The worker board: what each serving process of `serve --workers N` publishes for the others.

Every worker counts its own traffic. Once a second it publishes, under its slot in one small LMDB
environment, its cumulative counters per (model, version, role) (requests, errors, OOD, the latency
histogram), its shadow agreement, its drift alerts and its restart count, and appends the counters to a
history kept for `HISTORY_S`. Any worker can then answer for the whole gateway: a window's figures are
the difference between the newest snapshots and those taken a window ago, summed over slots (the
answering worker uses its own live counters). A slot's counters carry on across restarts (a new
process starts from the last totals its slot published), so sums never go backwards; a worker killed
with -9 loses at most its last second of counts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from gateway.ood.drift import WindowCounts
from gateway.stats import LATENCY_BUCKETS, Counts, Traffic, TrafficSummary

HISTORY_S = 900  # the longest status window a multi-worker gateway can answer
PUBLISH_INTERVAL_S = 1.0
STALE_S = 5 * PUBLISH_INTERVAL_S  # a worker silent this long is gone (killed, restarting)

TrafficKey = tuple[str, str, str]  # model, version, role
AgreementKey = tuple[str, str, str]  # model, primary version, shadow version
Agreement = tuple[int, int, int, int]  # compared, agreed, failed, shed


@dataclass
class WorkerSnapshot:
    """One worker's published state; counters are cumulative since its slot first served."""

    slot: int
    pid: int
    started_ns: int
    updated_ns: int
    restarts: int = 0
    counts: dict[TrafficKey, Counts] = field(default_factory=dict)
    agreement: dict[AgreementKey, Agreement] = field(default_factory=dict)
    drift_alerts: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (model, version) → features
    drift_counts: dict[tuple[str, str], list[object]] = field(default_factory=dict)  # WindowCounts.to_lists()
    serving: bool = False  # listening with its models warm
    ready: dict[str, list[str]] = field(default_factory=dict)  # model → its ready versions here


def add_counts(a: Counts, b: Counts) -> Counts:
    latency = tuple(x + y for x, y in zip(a.latency, b.latency, strict=True)) if a.latency and b.latency else None
    return Counts(
        a.requests + b.requests,
        a.errors + b.errors,
        a.ood_scored + b.ood_scored,
        a.ood_flagged + b.ood_flagged,
        latency if latency is not None else (a.latency or b.latency),
    )


def sum_counts(parts: Sequence[Mapping[TrafficKey, Counts]]) -> dict[TrafficKey, Counts]:
    total: dict[TrafficKey, Counts] = {}
    for part in parts:
        for key, counts in part.items():
            total[key] = add_counts(total[key], counts) if key in total else counts
    return total


def _pack_counts(counts: Mapping[TrafficKey, Counts]) -> list[Any]:
    # The histogram is sparse: a few dozen of its ~500 buckets hold anything.
    return [
        [*key, c.requests, c.errors, c.ood_scored, c.ood_flagged, {b: n for b, n in enumerate(c.latency) if n}]
        for key, c in counts.items()
    ]


def _unpack_counts(items: list[Any]) -> dict[TrafficKey, Counts]:
    counts = {}
    for model, version, role, requests, errors, scored, flagged, sparse in items:
        latency = [0] * LATENCY_BUCKETS
        for bucket, n in sparse.items():
            latency[bucket] = n
        counts[(model, version, role)] = Counts(requests, errors, scored, flagged, tuple(latency))
    return counts


def _slot_key(slot: int) -> bytes:
    return slot.to_bytes(2, "big")


def _history_key(slot: int, ts_ns: int) -> bytes:
    return slot.to_bytes(2, "big") + ts_ns.to_bytes(8, "big")


class WorkerBoard:
    """This worker's slot on the board, and everyone's snapshots; one per process."""

    def __init__(self, path: Path, slot: int, restarts: int = 0, count: int = 0) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.slot = slot
        self.count = count  # slots at or beyond it are a bigger earlier run's, ignored (0: all)
        self.restarts = restarts
        self.pid = os.getpid()
        self.started_ns = time.time_ns()
        # Figures a crash may lose a second of: no fsync per publish (a commit still survives the process).
        self._env = lmdb.open(str(path), map_size=1 << 28, max_dbs=2, sync=False, metasync=False)
        self._latest = self._env.open_db(b"latest")
        self._history = self._env.open_db(b"history")
        previous = self._read_slot(slot)
        # What this slot counted before this process: carried on so totals never go backwards.
        self._base_counts = previous.counts if previous else {}
        self._base_agreement = previous.agreement if previous else {}
        self.publish(self.totals({}, {}))  # windows starting from now count from these totals

    def totals(
        self, counts: Mapping[TrafficKey, Counts], agreement: Mapping[AgreementKey, Agreement]
    ) -> WorkerSnapshot:
        """This worker's snapshot now: the slot's earlier totals plus this process's live counters."""
        merged_agreement = dict(self._base_agreement)
        for key, value in agreement.items():
            before = merged_agreement.get(key, (0, 0, 0, 0))
            merged_agreement[key] = tuple(a + b for a, b in zip(before, value, strict=True))  # type: ignore[assignment]
        return WorkerSnapshot(
            self.slot,
            self.pid,
            self.started_ns,
            time.time_ns(),
            self.restarts,
            sum_counts([self._base_counts, counts]),
            merged_agreement,
        )

    def publish(self, snapshot: WorkerSnapshot) -> None:
        """Store `snapshot` as this slot's latest and in the history; forget history beyond HISTORY_S."""
        history_value = msgpack.packb(_pack_counts(snapshot.counts))
        value = msgpack.packb(
            {
                "pid": snapshot.pid,
                "started_ns": snapshot.started_ns,
                "updated_ns": snapshot.updated_ns,
                "restarts": snapshot.restarts,
                "counts": _pack_counts(snapshot.counts),
                "agreement": [[*key, *value] for key, value in snapshot.agreement.items()],
                "drift_alerts": [[*key, features] for key, features in snapshot.drift_alerts.items()],
                "drift_counts": [[*key, counts] for key, counts in snapshot.drift_counts.items()],
                "serving": snapshot.serving,
                "ready": snapshot.ready,
            }
        )
        oldest = _history_key(self.slot, max(0, snapshot.updated_ns - HISTORY_S * 1_000_000_000))
        with self._env.begin(write=True) as txn:
            txn.put(_slot_key(self.slot), value, db=self._latest)
            txn.put(_history_key(self.slot, snapshot.updated_ns), history_value, db=self._history)
            cursor = txn.cursor(db=self._history)
            if cursor.set_range(_history_key(self.slot, 0)):
                while cursor.key() < oldest and cursor.delete():
                    pass

    def _read_slot(self, slot: int) -> WorkerSnapshot | None:
        with self._env.begin(db=self._latest) as txn:
            value = txn.get(_slot_key(slot))
        return None if value is None else _snapshot(slot, msgpack.unpackb(value, strict_map_key=False))

    def snapshots(self) -> list[WorkerSnapshot]:
        """Every slot's latest snapshot, by slot (slots of this run only)."""
        with self._env.begin(db=self._latest) as txn:
            return [
                _snapshot(int.from_bytes(key, "big"), msgpack.unpackb(value, strict_map_key=False))
                for key, value in txn.cursor()
                if not self.count or int.from_bytes(key, "big") < self.count
            ]

    def counts_at(self, ts_ns: int, slots: list[int]) -> list[dict[TrafficKey, Counts]]:
        """Each slot's counters as last published at or before `ts_ns`, or its oldest kept ones (a
        window reaching back before the history counts from where the history starts)."""
        found = []
        with self._env.begin(db=self._history) as txn:
            cursor = txn.cursor()
            for slot in slots:
                prefix = _slot_key(slot)
                value = None
                if cursor.set_range(_history_key(slot, ts_ns + 1)) or cursor.last():
                    if cursor.key() > _history_key(slot, ts_ns) and cursor.key()[:2] == prefix:
                        value = cursor.value()  # the first entry after ts_ns; an earlier one wins below
                    if cursor.key() > _history_key(slot, ts_ns):
                        cursor.prev()
                    if cursor.key()[:2] == prefix and cursor.key() <= _history_key(slot, ts_ns):
                        value = cursor.value()
                found.append(_unpack_counts(msgpack.unpackb(value, strict_map_key=False)) if value else {})
        return found

    def close(self) -> None:
        self._env.close()


def _snapshot(slot: int, data: dict[str, Any]) -> WorkerSnapshot:
    return WorkerSnapshot(
        slot,
        data["pid"],
        data["started_ns"],
        data["updated_ns"],
        data["restarts"],
        _unpack_counts(data["counts"]),
        {(m, p, s): (c, a, f, shed) for m, p, s, c, a, f, shed in data["agreement"]},
        {(m, v): features for m, v, features in data["drift_alerts"]},
        {(m, v): counts for m, v, counts in data.get("drift_counts", [])},
        data.get("serving", False),
        data.get("ready", {}),
    )


@dataclass(frozen=True)
class WorkerIdentity:
    """Which of the supervisor's worker processes this is."""

    slot: int
    count: int
    restarts: int = 0  # how often the supervisor restarted this slot's worker
    gateway_started_ns: int = 0  # when the supervisor started: a restarted worker redoes model changes since


class GatewayTraffic:
    """Traffic figures of the whole gateway: this process's own, or with a board, every worker's summed.

    What `GetStatus`, `canary-gateway status` and the rollout driver read, so that one worker answers for
    all of them. Without a board (one process) the figures are exact and current; with one, other
    workers' figures are at most `PUBLISH_INTERVAL_S` old and latency quantiles have the histogram's
    12.5% resolution.
    """

    def __init__(
        self,
        traffic: Traffic,
        agreement: Callable[[], Mapping[AgreementKey, Agreement]],
        drift_alerts: Callable[[], dict[tuple[str, str], list[str]]],
        board: WorkerBoard | None,
        ready: Callable[[], Mapping[str, AbstractSet[str]]] = dict,
        drift_counts: Callable[[], dict[tuple[str, str], list[object]]] = dict,
    ) -> None:
        self._drift_counts = drift_counts
        self._traffic = traffic
        self._agreement = agreement
        self._drift_alerts = drift_alerts
        self._ready = ready
        self.board = board
        self.serving = False  # set once this worker listens with its models warm

    def own(self) -> WorkerSnapshot:
        assert self.board is not None
        snapshot = self.board.totals(self._traffic.all_counts(), self._agreement())
        snapshot.drift_alerts = self._drift_alerts()
        snapshot.drift_counts = self._drift_counts()
        snapshot.serving = self.serving
        snapshot.ready = {model: sorted(versions) for model, versions in self._ready().items()}
        return snapshot

    def ready_everywhere(self) -> dict[str, set[str]]:
        """Model → the versions ready here and in every other serving worker: what a route may use,
        since any worker may take a request routed by it."""
        ready = {model: set(versions) for model, versions in self._ready().items()}
        if self.board is None:
            return ready
        fresh_ns = time.time_ns() - int(STALE_S * 1e9)
        for worker in self.board.snapshots():
            if worker.slot == self.board.slot or not worker.serving or worker.updated_ns < fresh_ns:
                continue
            for model in ready:
                ready[model] &= set(worker.ready.get(model, ()))
        return ready

    def publish(self) -> None:
        if self.board is not None:
            self.board.publish(self.own())

    def workers(self) -> list[WorkerSnapshot]:
        """Every worker's snapshot (this one's current), by slot; empty for a single process."""
        if self.board is None:
            return []
        own = self.own()
        return sorted([s for s in self.board.snapshots() if s.slot != own.slot] + [own], key=lambda s: s.slot)

    def counts(self, model: str, version: str, role: str) -> Counts:
        """Cumulative counters of (model, version, role), over every worker."""
        if self.board is None:
            return self._traffic.counts(model, version, role)
        return sum_counts([w.counts for w in self.workers()]).get((model, version, role), Counts())

    def agreement(self, model: str, primary: str, shadow: str) -> tuple[int, int, int]:
        """Shadow (compared, agreed, failed) of `shadow` against `primary`, over every worker."""
        key = (model, primary, shadow)
        if self.board is None:
            compared, agreed, failed, _ = self._agreement().get(key, (0, 0, 0, 0))
            return compared, agreed, failed
        parts = [w.agreement.get(key, (0, 0, 0, 0)) for w in self.workers()]
        return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)

    def drift_alerts(self) -> dict[tuple[str, str], list[str]]:
        """(model, version) → its drifting features, for the versions any worker raised an alert on."""
        if self.board is None:
            return self._drift_alerts()
        merged: dict[tuple[str, str], list[str]] = {}
        for worker in self.workers():
            for key, features in worker.drift_alerts.items():
                merged[key] = sorted(set(merged.get(key, [])) | set(features))
        return merged

    def others_drift(self, model: str, version: str) -> tuple[list[WindowCounts], bool]:
        """The other workers' drift windows of a version (as of their last drift check) and whether any of
        them has its alert on; nothing for a single process."""
        if self.board is None:
            return [], False
        fresh_ns = time.time_ns() - int(STALE_S * 1e9)
        others = [
            w for w in self.board.snapshots() if w.slot != self.board.slot and w.serving and w.updated_ns >= fresh_ns
        ]
        windows = [
            WindowCounts.from_lists(w.drift_counts[(model, version)])
            for w in others
            if (model, version) in w.drift_counts
        ]
        return windows, any((model, version) in w.drift_alerts for w in others)

    def summaries(self, now_ns: int, window_s: float) -> dict[TrafficKey, TrafficSummary]:
        """Each (model, version, role)'s traffic over the last `window_s` seconds."""
        if self.board is None:
            return self._traffic.summaries(now_ns, window_s)
        workers = self.workers()
        since_ns = now_ns - int(window_s * 1e9)
        before = sum_counts(self.board.counts_at(since_ns, [w.slot for w in workers]))
        now = sum_counts([w.counts for w in workers])
        first_ns = min((w.started_ns for w in workers), default=now_ns)
        span_s = (now_ns - max(since_ns, first_ns)) / 1e9
        return {key: counts.since(before.get(key, Counts())).summary(span_s) for key, counts in sorted(now.items())}
