"""LMDB maps that change size while the process uses them: workers sharing the feedback store adopt the
map another one grew, and a resize waits for transactions in other threads instead of unmapping under them."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import lmdb

from gateway.feedback.store import KIND_LABEL, FeedbackStore, Truth
from gateway.mapguard import MapGuard

SMALL_MAP = 256 << 10

OTHER_WORKER = f"""
import sys
from pathlib import Path
from gateway.feedback.store import FeedbackStore, Truth
# Another worker with the store open: 20,000 truths, several times what the first map holds.
store = FeedbackStore(Path(sys.argv[1]), map_size={SMALL_MAP})
for start in range(0, 20_000, 2_000):
    store.put([(f"other-{{n}}", Truth({KIND_LABEL}, 1.0, 1)) for n in range(start, start + 2_000)])
store.close()
"""


def test_a_worker_adopts_the_feedback_map_another_worker_grew(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, map_size=SMALL_MAP)
    assert store.put([("mine-0", Truth(KIND_LABEL, 0.0, 1))]) == (1, 0)
    subprocess.run([sys.executable, "-c", OTHER_WORKER, str(tmp_path)], check=True, timeout=60)

    # Without adopting the grown map, every transaction here fails with MDB_MAP_RESIZED.
    assert store.put([("mine-1", Truth(KIND_LABEL, 1.0, 2)), ("other-7", Truth(KIND_LABEL, 0.0, 3))]) == (2, 1)
    assert store.count() == 20_002
    truths = store.get_many(["mine-0", "other-19999", "other-7"])
    assert sorted(t.truth for t in truths.values()) == [0.0, 0.0, 1.0]
    store.close()


def test_a_resize_waits_for_transactions_in_other_threads(tmp_path: Path) -> None:
    guard = MapGuard(lmdb.open(str(tmp_path), map_size=SMALL_MAP))
    grown = threading.Thread(target=guard.grow, args=(4 * SMALL_MAP,))
    with guard.transaction(write=True) as txn:
        txn.put(b"k", b"v")
        grown.start()
        grown.join(0.3)
        assert grown.is_alive(), "the map was resized under an open transaction"
        assert guard.env.info()["map_size"] == SMALL_MAP
    grown.join(10)
    assert not grown.is_alive() and guard.env.info()["map_size"] == 4 * SMALL_MAP
    with guard.transaction() as txn:
        assert txn.get(b"k") == b"v"  # the transaction that held the resize back committed
    guard.close()
    assert guard.closed
