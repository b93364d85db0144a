"""The persisted route table and change log: apply, history, promote, rollback, restart, refused changes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.errors import FailedPrecondition, GatewayError, InvalidArgument
from router.rules import Route, StickyKey, parse_shadows, parse_split
from router.store import RouteStore

READY = {"credit": {"1", "2", "3"}, "fraud": {"1"}}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RouteStore]:
    with RouteStore(tmp_path / "routes") as s:
        yield s


def _split(text: str) -> Route:
    return Route(split=parse_split(text))


def test_a_new_store_is_empty(store: RouteStore) -> None:
    assert store.load() == (0, {})
    assert store.table_version() == 0
    assert store.history() == []


def test_apply_stores_the_route_bumps_the_version_and_logs_the_change(store: RouteStore) -> None:
    before_ns = time.time_ns()
    entry = store.apply("credit", _split("1=90 2=10"), who="alice", why=" canary v2 ", action="split", ready=READY)
    assert (entry.seq, entry.who, entry.why, entry.action, entry.model) == (1, "alice", "canary v2", "split", "credit")
    assert entry.before is None and entry.after == _split("1=90 2=10")
    assert before_ns <= entry.time_ns <= time.time_ns()
    assert store.load() == (1, {"credit": _split("1=90 2=10")})
    assert store.history() == [entry]


def test_a_change_function_edits_the_current_route_or_the_default_one(store: RouteStore) -> None:
    sticky = StickyKey.parse("x-user-id")
    entry = store.apply(
        "credit",
        lambda r: dataclasses.replace(r, sticky_key=sticky),
        who="a",
        why="sticky",
        action="sticky",
        ready=READY,
    )
    assert entry.before is None
    assert entry.after == Route(split=(("3", 10000),), sticky_key=sticky)  # the highest ready version
    store.apply(
        "credit",
        lambda r: dataclasses.replace(r, shadows=parse_shadows("2=50")),
        who="a",
        why="compare v2",
        action="shadow",
        ready=READY,
    )
    assert store.load()[1]["credit"] == Route(split=(("3", 10000),), sticky_key=sticky, shadows=(("2", 5000),))


def _refused(store: RouteStore, **kwargs: object) -> GatewayError:
    snapshot = (store.load(), store.history())
    with pytest.raises(GatewayError) as e:
        store.apply(**kwargs)  # type: ignore[arg-type]
    assert (store.load(), store.history()) == snapshot, "a refused change wrote something"
    return e.value


def test_refused_changes_leave_the_table_and_the_log_unchanged(store: RouteStore) -> None:
    store.apply("credit", _split("1=100"), who="alice", why="baseline", action="split", ready=READY)
    base = {"who": "bob", "why": "try", "action": "split", "ready": READY}

    error = _refused(store, model="credit", change=_split("1=90 4=10"), **base)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "split: model 'credit' version '4'" in error.message

    def bad_edit(route: Route) -> Route:
        return Route(split=parse_split("1=90 2=5"))

    error = _refused(store, model="credit", change=bad_edit, **base)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "split: weights sum to 95%" in error.message

    error = _refused(store, model="credit", change=_split("1=50 2=50"), **{**base, "why": "  "})
    assert isinstance(error, InvalidArgument) and error.message.startswith("why:")
    error = _refused(store, model="credit", change=_split("1=50 2=50"), **{**base, "who": ""})
    assert error.message.startswith("who:")
    error = _refused(store, model="credit", change=_split("1=50 2=50"), **{**base, "action": "yolo"})
    assert error.message.startswith("action: 'yolo'")
    error = _refused(store, model="nope", change=_split("1=100"), **base)
    assert error.message == "model: 'nope' has no ready versions"


def test_promote_gives_the_candidate_all_traffic(store: RouteStore) -> None:
    store.apply("credit", _split("1=90 2=10"), who="alice", why="canary", action="split", ready=READY)
    entry = store.promote("credit", "2", who="alice", why="healthy", ready=READY)
    assert entry.action == "promote" and entry.after == _split("2=100") and entry.before == _split("1=90 2=10")
    with pytest.raises(FailedPrecondition, match="version '7'"):
        store.promote("credit", "7", who="alice", why="typo", ready=READY)
    assert store.table_version() == 2


def test_rollback_returns_to_the_route_before_the_last_change(store: RouteStore) -> None:
    with pytest.raises(FailedPrecondition, match="model: 'credit' has no route change to roll back"):
        store.rollback("credit", who="alice", why="oops", ready=READY)
    store.apply("credit", _split("1=95 2=5"), who="alice", why="canary 5%", action="split", ready=READY)
    store.apply("fraud", _split("1=100"), who="alice", why="pin fraud", action="split", ready=READY)
    store.apply("credit", _split("1=50 2=50"), who="alice", why="canary 50%", action="split", ready=READY)
    assert store.previous_route("credit") == _split("1=95 2=5")

    entry = store.rollback("credit", who="bob", why="errors up", ready=READY)
    assert (entry.action, entry.before, entry.after) == ("rollback", _split("1=50 2=50"), _split("1=95 2=5"))
    assert store.load()[1]["credit"] == _split("1=95 2=5")
    store.rollback("credit", who="bob", why="undo the rollback", ready=READY)  # like `cd -`
    assert store.load()[1]["credit"] == _split("1=50 2=50")

    store.rollback("fraud", who="bob", why="back to no route", ready=READY)
    assert "fraud" not in store.load()[1]
    assert store.table_version() == 6


def test_a_rollback_to_a_version_that_is_no_longer_ready_is_refused(store: RouteStore) -> None:
    store.apply("credit", _split("1=90 2=10"), who="alice", why="canary", action="split", ready=READY)
    store.apply("credit", _split("1=100"), who="alice", why="drain v2", action="split", ready=READY)
    snapshot = (store.load(), store.history())
    with pytest.raises(FailedPrecondition, match="version '2' is not ready"):
        store.rollback("credit", who="bob", why="oops", ready={"credit": {"1"}})
    assert (store.load(), store.history()) == snapshot


def test_history_filters_by_model_and_time(store: RouteStore) -> None:
    first = store.apply("credit", _split("1=100"), who="a", why="one", action="split", ready=READY)
    second = store.apply("fraud", _split("1=100"), who="a", why="two", action="split", ready=READY)
    third = store.apply("credit", _split("2=100"), who="a", why="three", action="split", ready=READY)
    assert store.history("credit") == [first, third]
    assert store.history("fraud") == [second]
    assert store.history("cred") == [] and store.history("credit2") == []
    assert store.history(since_ns=second.time_ns) == [second, third]
    assert store.history(until_ns=second.time_ns) == [first]
    assert store.history("credit", since_ns=second.time_ns, until_ns=third.time_ns + 1) == [third]


def test_a_restart_keeps_routes_and_history(tmp_path: Path) -> None:
    route = Route(split=parse_split("1=99.5 2=0.5"), sticky_key=StickyKey.parse("param:account"), allow_pinning=False)
    with RouteStore(tmp_path / "routes") as store:
        store.apply("credit", route, who="alice", why="half a percent", action="split", ready=READY)
        history = store.history()
    with RouteStore(tmp_path / "routes") as store:
        assert store.load() == (1, {"credit": route})
        assert store.history() == history
        assert store.rollback("credit", who="bob", why="after restart", ready=READY).after is None


def test_other_processes_see_changes_and_their_readers_never_block_the_writer(store: RouteStore) -> None:
    """A worker holding a read snapshot does not stop a change; its next read sees the new version."""
    reader = textwrap.dedent(
        f"""
        import sys, lmdb
        from router.store import RouteStore
        env = lmdb.open({str(store.path)!r}, max_dbs=4, readonly=True)
        meta = env.open_db(b"meta", create=False)
        txn = env.begin()
        print(int.from_bytes(txn.get(b"version", b"", db=meta) or b"\\0", "big"), flush=True)
        sys.stdin.readline()  # hold the snapshot while the parent writes
        print(int.from_bytes(txn.get(b"version", db=meta), "big"), flush=True)
        txn.abort()
        env.close()
        with RouteStore({str(store.path)!r}) as other:
            print(other.table_version(), sorted(other.load()[1]), flush=True)
        """
    )
    store.apply("credit", _split("1=100"), who="a", why="first", action="split", ready=READY)
    child = subprocess.Popen([sys.executable, "-c", reader], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline().strip() == "1"
        start = time.monotonic()
        for i in range(5):
            model, split = ("fraud", "1=100") if i == 4 else ("credit", "1=50 2=50" if i % 2 == 0 else "1=100")
            store.apply(model, _split(split), who="a", why=f"change {i}", action="split", ready=READY)
        assert time.monotonic() - start < 5
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "1"  # its snapshot
        assert child.stdout.readline().strip() == "6 ['credit', 'fraud']"
    finally:
        child.communicate(timeout=30)
    assert child.returncode == 0


def test_a_change_that_changes_nothing_is_not_logged(store: RouteStore) -> None:
    store.apply("credit", _split("1=90 2=10"), who="a", why="canary", action="split", ready=READY)
    before, version = store.history("credit"), store.table_version()
    entry = store.apply("credit", _split("2=10 1=90"), who="a", why="same again", action="split", ready=READY)
    assert entry.before == entry.after and entry.seq == 0  # not the last change's seq: that change is not this one
    assert store.history("credit") == before and store.table_version() == version


def _unload(store: RouteStore, version: str, who: str = "bob") -> object:
    return store.record("credit", "unload", who=who, why="retire", details={"version": version, "sha256": "0" * 64})


def test_a_route_to_a_version_unloaded_while_serving_is_refused_whatever_the_ready_view_says(tmp_path: Path) -> None:
    """With several workers an edit's `ready` view (the worker board) can be a second old: a split made
    through one worker right after another unloaded a version used to route traffic to it."""
    with RouteStore(tmp_path / "routes", serving_since_ns=time.time_ns()) as store:
        store.apply("credit", _split("1=100"), who="alice", why="start", action="split", ready=READY)
        _unload(store, "2")
        with pytest.raises(FailedPrecondition, match=r"version '2' was unloaded \(change 2 by bob\)"):
            store.apply("credit", _split("1=50 2=50"), who="carol", why="canary", action="split", ready=READY)
        with pytest.raises(FailedPrecondition, match="'2' was unloaded"):  # as a shadow too
            store.apply(
                "credit",
                Route(split=parse_split("1=100"), shadows=parse_shadows("2=10")),
                who="c",
                why="shadow",
                action="shadow",
                ready=READY,
            )
        assert store.table_version() == 2  # nothing written
        store.record("credit", "load", who="bob", why="back", details={"version": "2", "sha256": "0" * 64})
        store.apply("credit", _split("1=50 2=50"), who="carol", why="canary", action="split", ready=READY)
    with RouteStore(tmp_path / "routes", serving_since_ns=time.time_ns()) as restarted:
        _unload(restarted, "3")  # ...then the gateway restarts, loading every version again
    with RouteStore(tmp_path / "routes", serving_since_ns=time.time_ns()) as restarted:
        restarted.apply("credit", _split("1=50 3=50"), who="carol", why="v3", action="split", ready=READY)


def test_an_unload_is_refused_when_the_stored_route_sends_the_version_traffic(store: RouteStore) -> None:
    """Checked in the transaction that logs the unload: the unloading worker's table may be a few ms old."""
    store.apply("credit", _split("1=90 2=10"), who="alice", why="canary", action="split", ready=READY)
    with pytest.raises(FailedPrecondition, match="version '2' cannot be unloaded: its route, as stored now"):
        _unload(store, "2")
    assert store.table_version() == 1
    _unload(store, "3")  # no traffic: fine
    assert [e.action for e in store.history()] == ["split", "unload"]
