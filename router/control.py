"""The live route table and the one way to change it: validate, persist with its change-log entry,
then swap the new table in with one assignment.

A request reads `control.table` once; an edit builds a new `RouteTable` from the store and replaces
the attribute, so every request sees the old table or the new one, never a mix. A rejected edit
raises before anything is written and leaves the table untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet

import lmdb

from gateway.errors import FailedPrecondition
from router.rules import Route, default_route, highest
from router.store import Action, Change, ChangeEntry, ModelAction, RouteStore
from router.table import RouteTable

log = logging.getLogger(__name__)

Ready = Callable[[], Mapping[str, AbstractSet[str]]]


class RouteControl:
    def __init__(self, store: RouteStore, ready: Ready, poll_s: float = 0.005) -> None:
        self._store = store
        self._ready = ready  # model -> its ready versions, asked at each edit
        self._poll_s = poll_s
        self._next_poll = 0.0
        self.table = self._load()

    def current(self) -> RouteTable:
        """The table a request routes by: re-read when another process (a worker, the CLI) changed the
        store, looked at no more often than every `poll_s` (one LMDB read, not one per request)."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self._poll_s
            try:
                self.refresh()
            except lmdb.Error:
                log.exception("cannot read the route table's version; routing by the table held")
        return self.table

    def _load(self) -> RouteTable:
        version, routes = self._store.load()
        return RouteTable(routes, version)

    def refresh(self) -> bool:
        """Pick up edits made by another process (another worker, the CLI); True if the table changed."""
        if self._store.table_version() == self.table.version:
            return False
        self.table = self._load()
        return True

    def change(self, model: str, change: Change, *, who: str, why: str, action: Action) -> ChangeEntry:
        entry = self._store.apply(model, change, who=who, why=why, action=action, ready=self._ready())
        self.table = self._load()
        return entry

    def record(self, model: str, action: ModelAction, *, who: str, why: str, details: Mapping[str, str]) -> ChangeEntry:
        """Log a model version loaded, unloaded or replaced (the route is unchanged)."""
        entry = self._store.record(model, action, who=who, why=why, details=details)
        self.table = self._load()
        return entry

    def promote(self, model: str, version: str, *, who: str, why: str) -> ChangeEntry:
        entry = self._store.promote(model, version, who=who, why=why, ready=self._ready())
        self.table = self._load()
        return entry

    def rollback(self, model: str, *, who: str, why: str) -> ChangeEntry:
        entry = self._store.rollback(model, who=who, why=why, ready=self._ready())
        self.table = self._load()
        return entry

    def note(self, model: str, *, who: str, why: str) -> ChangeEntry:
        """A change-log entry that leaves the route as it is (a rollout paused, resumed, started)."""
        entry = self._store.note(model, who=who, why=why)
        self.table = self._load()
        return entry

    def history(self, model: str | None, since_ns: int | None, until_ns: int | None) -> list[ChangeEntry]:
        return self._store.history(model, since_ns, until_ns)

    def route(self, model: str) -> Route | None:
        return self.current().route(model)

    def effective_route(self, model: str) -> Route:
        """The model's route, or for a model without one the default (its highest ready version)."""
        route = self.current().route(model)
        if route is not None:
            return route
        available = self._ready().get(model)
        if not available:
            raise FailedPrecondition(f"model: {model!r} has no ready versions")
        return default_route(highest(available))

    def close(self) -> None:
        self._store.close()
