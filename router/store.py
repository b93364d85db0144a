"""The route table and its append-only change log, persisted in LMDB.

One write transaction per change reads the current route, builds and validates the new one, stores it,
appends the change-log entry and bumps the table version; any error aborts the transaction, so a rejected
change writes nothing. The table version equals the sequence number of the last change, so a worker
process can poll `table_version()` (one read transaction, a few microseconds) and reload only when it
moved. LMDB readers see a snapshot and never block the one writer, and the environment is safe to share
between processes; open one `RouteStore` per process (after forking), as LMDB requires.

Layout (named databases; integers are 8-byte big-endian so keys sort numerically):
`meta`: format, version. `routes`: model → route (msgpack). `log`: seq → entry (msgpack).
`log_by_model`: model NUL seq → empty, to find a model's changes without scanning the whole log.

Rollback returns a model to the route before its last change (notes, entries of action `rollout` that
changed nothing, are skipped), and is itself a change: rolling back twice
returns to where the first rollback started, like `cd -`. A route of None means "no route" (the model
serves its highest version).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast, get_args

import lmdb
import msgpack

from gateway.errors import ConfigError, FailedPrecondition, InvalidArgument
from router import rules
from router.rules import Route

RouteAction = Literal["split", "sticky", "shadow", "pin", "override", "promote", "rollback", "rollout", "config"]
"""`rollout`: a progressive rollout's decision that leaves the route as it is (started, paused, resumed);
`config`: the route set from the deployment's routes file at startup (router.seed)."""
ModelAction = Literal["load", "unload", "replace"]  # model versions coming and going: logged, route unchanged
Action = RouteAction | ModelAction
ROUTE_ACTIONS: tuple[RouteAction, ...] = get_args(RouteAction)
MODEL_ACTIONS: tuple[ModelAction, ...] = get_args(ModelAction)
ACTIONS: tuple[Action, ...] = ROUTE_ACTIONS + MODEL_ACTIONS
NOTES: tuple[Action, ...] = ("rollout", *MODEL_ACTIONS)  # logged, but changed no route: rollback skips them

Change = Route | None | Callable[[Route], Route | None]
"""A new route (None removes the route), or a function of the current one."""

_FORMAT = b"1"
_NUL = b"\x00"


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _route_data(route: Route | None) -> dict[str, Any] | None:
    return None if route is None else route.to_dict()


def _routed(route: Route) -> set[str]:
    """The versions `route` sends traffic to, as primary or shadow."""
    return {v for v, bps in (*route.split, *route.shadows) if bps > 0}


def _route_of(data: Mapping[str, Any] | None) -> Route | None:
    return None if data is None else Route.from_dict(data)


@dataclass(frozen=True)
class ChangeEntry:
    """One change-log entry: who changed which model's route, when, why, and the route before and after.

    A model action (a version loaded, unloaded or replaced) leaves the route as it was and says what
    happened in `details` (version, sha256, ...). Seq 0 (logged seqs start at 1): a route change that
    changed nothing, returned to its caller but not logged."""

    seq: int
    time_ns: int
    who: str
    why: str
    action: Action
    model: str
    before: Route | None
    after: Route | None
    details: Mapping[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (msgpack / JSON), the stored form."""
        return {
            "seq": self.seq,
            "time_ns": self.time_ns,
            "who": self.who,
            "why": self.why,
            "action": self.action,
            "model": self.model,
            "before": _route_data(self.before),
            "after": _route_data(self.after),
            "details": None if self.details is None else dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChangeEntry:
        return cls(
            seq=data["seq"],
            time_ns=data["time_ns"],
            who=data["who"],
            why=data["why"],
            action=data["action"],
            model=data["model"],
            before=_route_of(data["before"]),
            after=_route_of(data["after"]),
            details=data.get("details"),
        )


class RouteStore:
    """The persisted route table and change log in the LMDB environment at directory `path`.

    `map_size` only reserves address space (the file grows as it fills); 1 GiB holds millions of changes.
    """

    def __init__(self, path: str | Path, map_size: int = 1 << 30, serving_since_ns: int | None = None) -> None:
        self.path = Path(path)
        # When the gateway using this store started (None: no gateway serves from it). Versions unloaded since
        # then are gone from every worker; earlier unloads were undone by the start, which loads every version.
        self._serving_since_ns = serving_since_ns
        self.path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(self.path), map_size=map_size, max_dbs=4)
        self._meta = self._env.open_db(b"meta")
        self._routes = self._env.open_db(b"routes")
        self._log = self._env.open_db(b"log")
        self._by_model = self._env.open_db(b"log_by_model")
        with self._env.begin(write=True) as txn:
            stored = txn.get(b"format", db=self._meta)
            if stored is None:
                txn.put(b"format", _FORMAT, db=self._meta)
            elif stored != _FORMAT:
                raise ConfigError(f"{self.path}: route store format {bytes(stored)!r}; this gateway reads {_FORMAT!r}")

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> RouteStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def table_version(self) -> int:
        """The number of changes applied so far: cheap to poll for "did the table change?"."""
        with self._env.begin() as txn:
            return self._version(txn)

    def load(self) -> tuple[int, dict[str, Route]]:
        """The table version and every model's route, read in one snapshot."""
        with self._env.begin() as txn:
            routes = {
                key.decode(): Route.from_dict(msgpack.unpackb(value)) for key, value in txn.cursor(db=self._routes)
            }
            return self._version(txn), routes

    def apply(
        self,
        model: str,
        change: Change,
        *,
        who: str,
        why: str,
        action: Action,
        ready: Mapping[str, AbstractSet[str]],
    ) -> ChangeEntry:
        """Validate and apply one change to `model`'s route and log it, atomically; return the log entry.

        A function `change` receives the current route, or for a model without one the default route
        (its highest ready version takes all traffic). `ready` maps models to their ready versions; every
        version of the new route must be one. On any error nothing is written.
        """

        def target(_txn: lmdb.Transaction, current: Route | None) -> Route | None:
            if not callable(change):
                return change
            return change(current if current is not None else self._default(model, ready))

        return self._write(model, who, why, action, ready, target)

    def promote(
        self, model: str, version: str, *, who: str, why: str, ready: Mapping[str, AbstractSet[str]]
    ) -> ChangeEntry:
        """`version` takes all of `model`'s traffic (sticky key, pin policy and other shadows are kept)."""
        return self.apply(
            model, lambda route: rules.promote(route, version), who=who, why=why, action="promote", ready=ready
        )

    def rollback(self, model: str, *, who: str, why: str, ready: Mapping[str, AbstractSet[str]]) -> ChangeEntry:
        """Return `model` to the route it had before its last change (validated like any change)."""
        return self._write(model, who, why, "rollback", ready, lambda txn, _current: self._previous(txn, model))

    def record(self, model: str, action: ModelAction, *, who: str, why: str, details: Mapping[str, str]) -> ChangeEntry:
        """Log a model action (a version loaded, unloaded, replaced) in the change log; the route stays."""
        if action not in MODEL_ACTIONS:
            raise InvalidArgument(f"action: {action!r} is not one of {', '.join(MODEL_ACTIONS)}")
        version = details.get("version", "")

        def unchanged_route(_txn: lmdb.Transaction, current: Route | None) -> Route | None:
            # Checked on the route as stored, in the transaction that logs the unload: a worker's own view may
            # be a few milliseconds old, and another worker may have just routed traffic to the version.
            if action == "unload" and current is not None and version in _routed(current):
                raise FailedPrecondition(
                    f"model {model!r} version {version!r} cannot be unloaded: its route, as stored now, sends it "
                    "traffic; route its traffic elsewhere first"
                )
            return current

        return self._write(model, who, why, action, {}, unchanged_route, details=details, unchanged=True)

    def note(self, model: str, *, who: str, why: str) -> ChangeEntry:
        """Log a rollout action that leaves the route unchanged (before == after), so the change log holds
        every decision about a model's traffic, not only the edits."""
        return self._write(model, who, why, "rollout", {}, lambda _txn, current: current, unchanged=True)

    def previous_route(self, model: str) -> Route | None:
        """The route before `model`'s last change (None: it had none); FailedPrecondition without history."""
        with self._env.begin() as txn:
            return self._previous(txn, model)

    def history(
        self, model: str | None = None, since_ns: int | None = None, until_ns: int | None = None
    ) -> list[ChangeEntry]:
        """Change-log entries, oldest first, optionally of one model and with since_ns <= time_ns < until_ns."""
        with self._env.begin() as txn:
            return [
                entry
                for entry in self._entries(txn, model)
                if (since_ns is None or entry.time_ns >= since_ns) and (until_ns is None or entry.time_ns < until_ns)
            ]

    def _write(
        self,
        model: str,
        who: str,
        why: str,
        action: Action,
        ready: Mapping[str, AbstractSet[str]],
        target: Callable[[lmdb.Transaction, Route | None], Route | None],
        details: Mapping[str, str] | None = None,
        unchanged: bool = False,
    ) -> ChangeEntry:
        if not isinstance(model, str) or not model:
            raise InvalidArgument(f"model: {model!r} must be a model name")
        if not isinstance(who, str) or not who.strip():
            raise InvalidArgument(f"who: {who!r}; a change needs the identity that makes it")
        if not isinstance(why, str) or not why.strip():
            raise InvalidArgument(f"why: {why!r}; a change needs a reason")
        if action not in ACTIONS:
            raise InvalidArgument(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
        key = model.encode()
        with self._env.begin(write=True) as txn:  # an exception aborts: nothing is written
            current = _route_of(self._unpack(txn.get(key, db=self._routes)))
            after = target(txn, current)
            if after == current and not unchanged:
                # Idempotent, like applying a declarative config twice: nothing is written, so the
                # table version stays and the next rollback still undoes the last real change. Seq 0, not
                # the table version: that is the last change's number, someone else's change.
                return ChangeEntry(0, time.time_ns(), who, why.strip(), action, model, current, after)
            if after is not None and after != current:
                rules.validate(model, after, ready)
                self._refuse_unloaded(txn, model, after)
            seq = self._version(txn) + 1
            entry = ChangeEntry(seq, time.time_ns(), who, why.strip(), action, model, current, after, details)
            txn.put(_u64(seq), msgpack.packb(entry.to_dict()), db=self._log)
            txn.put(key + _NUL + _u64(seq), b"", db=self._by_model)
            if after is None:
                txn.delete(key, db=self._routes)
            else:
                txn.put(key, msgpack.packb(after.to_dict()), db=self._routes)
            txn.put(b"version", _u64(seq), db=self._meta)
        return entry

    def _default(self, model: str, ready: Mapping[str, AbstractSet[str]]) -> Route:
        available = ready.get(model)
        if not available:
            raise FailedPrecondition(f"model: {model!r} has no ready versions")
        return rules.default_route(rules.highest(available))

    def _refuse_unloaded(self, txn: lmdb.Transaction, model: str, route: Route) -> None:
        """FailedPrecondition if `route` sends traffic to a version unloaded while this gateway serves: a
        worker's `ready` view (the worker board) can be a second old, the change log in this transaction is not."""
        if self._serving_since_ns is None:
            return
        wanted = _routed(route)
        for entry in self._newest_first(txn, model):
            if entry.time_ns < self._serving_since_ns or not wanted:
                return
            version = (entry.details or {}).get("version")
            if entry.action in MODEL_ACTIONS and version in wanted:
                if entry.action == "unload":
                    raise FailedPrecondition(
                        f"model {model!r} version {version!r} was unloaded (change {entry.seq} by {entry.who}); "
                        "load it before routing traffic to it"
                    )
                wanted.discard(version)  # loaded (or replaced) since its last unload

    def _newest_first(self, txn: lmdb.Transaction, model: str) -> Iterator[ChangeEntry]:
        prefix = model.encode() + _NUL
        cursor = txn.cursor(db=self._by_model)
        # The model's last entry is the greatest key below prefix + 0xff...: step back from where that would go.
        found = cursor.prev() if cursor.set_range(prefix + b"\xff" * 8) else cursor.last()
        while found and bytes(cursor.key()).startswith(prefix):
            key = bytes(cursor.key())
            yield ChangeEntry.from_dict(msgpack.unpackb(txn.get(key[len(prefix) :], db=self._log)))
            found = cursor.prev()

    def _previous(self, txn: lmdb.Transaction, model: str) -> Route | None:
        for entry in self._newest_first(txn, model):
            if entry.action not in NOTES:  # notes (rollout decisions, model loads) changed no route
                return entry.before
        raise FailedPrecondition(f"model: {model!r} has no route change to roll back")

    def _entries(self, txn: lmdb.Transaction, model: str | None) -> Iterator[ChangeEntry]:
        if model is None:
            for _, value in txn.cursor(db=self._log):
                yield ChangeEntry.from_dict(msgpack.unpackb(value))
            return
        prefix = model.encode() + _NUL
        cursor = txn.cursor(db=self._by_model)
        if not cursor.set_range(prefix):
            return
        for raw_key in cursor.iternext(values=False):
            key = bytes(raw_key)
            if not key.startswith(prefix):
                return
            yield ChangeEntry.from_dict(msgpack.unpackb(txn.get(key[len(prefix) :], db=self._log)))

    def _version(self, txn: lmdb.Transaction) -> int:
        value = txn.get(b"version", db=self._meta)
        return 0 if value is None else int.from_bytes(value, "big")

    @staticmethod
    def _unpack(value: bytes | None) -> dict[str, Any] | None:
        return None if value is None else cast(dict[str, Any], msgpack.unpackb(value))
