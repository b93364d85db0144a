"""The worker board on real LMDB: slots published and summed, windows from the history, restarts that
carry a slot's totals on. (LMDB opens an environment once per process: slots here take turns.)"""

from __future__ import annotations

import time
from pathlib import Path

from gateway.stats import LATENCY_BUCKETS, Counts, Traffic, latency_bucket
from gateway.workerboard import GatewayTraffic, WorkerBoard

KEY = ("m", "1", "primary")


def _counts(requests: int, errors: int = 0, latency_ns: int = 1_000_000) -> Counts:
    latency = [0] * LATENCY_BUCKETS
    latency[latency_bucket(latency_ns)] = requests - errors
    return Counts(requests, errors, 0, 0, tuple(latency))


def test_a_slot_publishes_and_another_reads_it(tmp_path: Path) -> None:
    one = WorkerBoard(tmp_path, 0)
    one.publish(one.totals({KEY: _counts(10, 2)}, {("m", "1", "2"): (5, 4, 1, 0)}))
    one.close()
    two = WorkerBoard(tmp_path, 1)
    snapshots = {s.slot: s for s in two.snapshots()}
    assert snapshots[0].counts[KEY] == _counts(10, 2)
    assert snapshots[0].agreement[("m", "1", "2")] == (5, 4, 1, 0)
    assert snapshots[1].counts == {}  # slot 1 published its (empty) start


def test_a_restarted_slot_carries_its_totals_on(tmp_path: Path) -> None:
    first = WorkerBoard(tmp_path, 0)
    first.publish(first.totals({KEY: _counts(10)}, {}))
    first.close()
    again = WorkerBoard(tmp_path, 0, restarts=1)
    snapshot = again.totals({KEY: _counts(3)}, {})
    assert snapshot.counts[KEY].requests == 13 and snapshot.restarts == 1


def test_counts_at_takes_the_entry_at_or_before_a_time_else_the_oldest(tmp_path: Path) -> None:
    other = WorkerBoard(tmp_path, 0)  # entries of other slots around ours must not be taken
    other.publish(other.totals({KEY: _counts(100)}, {}))
    other.close()
    board = WorkerBoard(tmp_path, 1)
    for ts, n in ((100, 1), (200, 2), (300, 3)):
        snapshot = board.totals({KEY: _counts(n)}, {})
        snapshot.updated_ns = ts
        board.publish(snapshot)
    board.close()
    board = WorkerBoard(tmp_path, 2)
    assert board.counts_at(250, [1])[0][KEY].requests == 2
    assert board.counts_at(300, [1])[0][KEY].requests == 3
    assert board.counts_at(50, [1])[0][KEY].requests == 1  # before the history: where it starts
    # Slot 0's history begins later, with the empty totals of its start; slot 3 never published.
    slot0, slot1, slot3 = board.counts_at(250, [0, 1, 3])
    assert (slot0, slot1[KEY].requests, slot3) == ({}, 2, {})


def test_gateway_traffic_sums_every_worker_and_windows_by_difference(tmp_path: Path) -> None:
    remote = WorkerBoard(tmp_path, 1)
    remote.publish(remote.totals({KEY: _counts(40, 4)}, {}))
    remote.close()
    traffic = Traffic()
    for _ in range(6):
        traffic.add(*KEY, 2_000_000, True, None)
    local = GatewayTraffic(traffic, dict, dict, WorkerBoard(tmp_path, 0))
    assert local.counts(*KEY).requests == 46
    assert local.counts(*KEY).errors == 4
    assert [w.slot for w in local.workers()] == [0, 1]
    summary = local.summaries(time.time_ns(), 60.0)[KEY]
    assert summary.requests == 46 and abs(summary.error_rate - 4 / 46) < 1e-9
    single = GatewayTraffic(traffic, dict, dict, None)
    assert single.counts(*KEY).requests == 6 and single.workers() == []


def test_slots_of_a_bigger_earlier_run_are_ignored(tmp_path: Path) -> None:
    for slot in range(4):  # an earlier run with 4 workers
        board = WorkerBoard(tmp_path, slot)
        board.publish(board.totals({KEY: _counts(10)}, {}))
        board.close()
    now = WorkerBoard(tmp_path, 0, count=2)
    assert [s.slot for s in now.snapshots()] == [0, 1]
