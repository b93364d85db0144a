"""Transactions on an LMDB environment whose map may change size (or close) while other threads use it.

LMDB lets a process change an environment's map size only while no transaction is active on it in that
process: a resize unmaps the old mapping. py-lmdb before 2.2 then let a reader on another thread read
unmapped memory; since then it invalidates the other threads' open transactions, so their next operation
fails with `lmdb.Error` (and a resize while another thread writes is refused). A resize happens when the
writer grows a full map, and when any process adopts the size another process grew the file to (LMDB then
refuses every transaction with MDB_MAP_RESIZED until it does). Closing has the same hazard. So threads in
transactions share this guard; a resize or close waits for them to finish and holds new ones back.
Transactions stay short (readers read in bounded chunks), so the wait is too."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import lmdb

_Opened = TypeVar("_Opened")


class EnvironmentClosed(Exception):
    """The environment was closed (a rotated or deleted log segment) while a transaction waited for it."""


def opening(env: lmdb.Environment, open_databases: Callable[[], _Opened]) -> _Opened:
    """`open_databases()` on a just-opened environment, before any guard exists (a guard's transactions
    need the databases). Its transaction fails with MDB_MAP_RESIZED if another process grew the map
    meanwhile: then the new size is adopted, once."""
    try:
        return open_databases()
    except lmdb.MapResizedError:
        env.set_mapsize(0)  # 0: the size the file's header records now
        return open_databases()


class MapGuard:
    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self._path = env.path()
        self._lock = threading.Lock()  # the fast path takes the lock directly: Condition's `with` is Python
        self._state = threading.Condition(self._lock)
        self._active = 0  # transactions (and syncs) running on `env`
        self._exclusive = False  # a resize or close is waiting for them, or running
        self.closed = False

    def transaction(self, write: bool = False, db: Any = None) -> _Transaction:
        """A transaction (committed on success, aborted on error), after adopting a map another
        process grew."""
        return _Transaction(self, write, db)

    def put(self, items: tuple[tuple[Any, bytes, bytes], ...]) -> None:
        """Put `(db, key, value)` items in one write transaction: the request log's commit, once per
        request, without a context object's three calls around it."""
        txn = self._begin(True, None)
        try:
            for db, key, value in items:
                txn.put(key, value, db=db)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        finally:
            self._leave()

    @contextmanager
    def shared(self) -> Iterator[lmdb.Environment]:
        """The environment, for calls that touch the map outside a transaction (`sync`)."""
        self._enter()
        try:
            yield self.env
        finally:
            self._leave()

    def grow(self, size: int) -> None:
        """Map at least `size` bytes (two threads that both found the map full grow it once). Never call
        it inside a transaction on the same environment: it would wait for that transaction."""
        with self._alone():
            if size > self.env.info()["map_size"]:
                self.env.set_mapsize(size)

    def close(self) -> None:
        with self._alone():
            self.env.close()
            self.closed = True

    def _begin(self, write: bool, db: Any) -> lmdb.Transaction[bytes]:
        while True:
            self._enter()
            try:
                return self.env.begin(write=write, db=db)
            except lmdb.MapResizedError:
                self._leave()
                with self._alone():
                    self.env.set_mapsize(0)  # 0: the size the file's header records now
            except BaseException:
                self._leave()
                raise

    def _enter(self) -> None:
        with self._lock:
            while self._exclusive:
                self._state.wait()
            if self.closed:
                raise EnvironmentClosed(self._path)
            self._active += 1

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._exclusive and not self._active:
                self._state.notify_all()

    @contextmanager
    def _alone(self) -> Iterator[None]:
        with self._state:
            while self._exclusive:
                self._state.wait()
            self._exclusive = True
            while self._active:
                self._state.wait()
        try:
            yield
        finally:
            with self._state:
                self._exclusive = False
                self._state.notify_all()


class _Transaction:
    """A class, not @contextmanager: a generator-based context costs about as much as a small commit."""

    __slots__ = ("_guard", "_write", "_db", "_txn")

    def __init__(self, guard: MapGuard, write: bool, db: Any) -> None:
        self._guard, self._write, self._db = guard, write, db

    def __enter__(self) -> lmdb.Transaction[bytes]:
        self._txn = self._guard._begin(self._write, self._db)
        return self._txn

    def __exit__(self, *exc: object) -> None:
        try:
            self._txn.__exit__(*exc)  # commits, or aborts on an exception
        finally:
            self._guard._leave()
