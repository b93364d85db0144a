"""`serve --workers N`: N serving processes sharing one port, under one supervisor process.

One Python process serves on one core (the GIL), so the gateway runs N workers that all listen on the
same port with `SO_REUSEPORT`; the kernel spreads connections over them. Workers are started fresh
(`multiprocessing`'s spawn: fork and exec), not forked from a warm parent: gRPC's core and
onnxruntime's thread pools do not survive a fork. The supervisor opens no gRPC server, no model and
no LMDB environment; it only

- reserves the port (bound with SO_REUSEPORT, never listening) so that port 0 names one free port
  for every worker, and no other program takes it between restarts;
- starts the workers and waits until each is ready; if one cannot start, it stops the others and
  exits with that worker's exit code (2 for a configuration error, as `serve` does);
- restarts a worker that dies, after a backoff that doubles while restarts keep failing (the count
  is published by the worker as the `gateway.worker.restarts` metric and in `status`);
- forwards SIGTERM and SIGINT so that every worker drains, and exits 0 when they all did.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from gateway.config import MAX_PORT, GatewayConfig, address
from gateway.errors import ConfigError
from gateway.workerboard import WorkerIdentity

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STARTUP_TIMEOUT_S = 600.0  # loading and warming up every model version


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT and not listening: it holds the port (0 picks
    one) without taking connections, which go to the workers' listening sockets. The port is first
    bound without SO_REUSEPORT, so a port another gateway (or anything else) holds is an error, not a
    port silently shared with it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))  # OSError (address in use) when anyone holds it
        port = probe.getsockname()[1]
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host, port))
    return reserved


def _reserve(host: str, port: int, key: str) -> socket.socket:
    try:
        return reserve_port(host, port)
    except OSError as e:
        raise ConfigError(f"{key}: cannot listen on {address(host, port)}: {e.strerror}") from None


@dataclass
class _Worker:
    slot: int
    process: BaseProcess
    ready: Connection  # the worker sends one message when it serves
    restarts: int
    is_ready: bool = False


def _stop_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel SIGTERM this worker when the supervisor dies, `kill -9` included: nobody else
    would stop it, and it (with its feedback ingest child) would serve on and hold the port. SIGTERM,
    so that it drains as on a forwarded stop. Linux only; elsewhere a worker outlives a killed supervisor."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # it died before the prctl: no signal will come
        sys.exit("the supervisor is gone; not starting")


def _run_worker(
    config: GatewayConfig, identity: WorkerIdentity, use_uvloop: bool, ready: Connection, supervisor_pid: int
) -> None:
    """A worker process: serve `config` until SIGTERM; tell the supervisor through `ready` once serving."""
    _stop_with_supervisor(supervisor_pid)

    from gateway import eventloop
    from gateway.server import serve

    logging.basicConfig(
        level=config.server.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker {identity.slot} %(name)s: %(message)s",
    )
    try:
        eventloop.run(serve(config, identity, on_ready=lambda: ready.send(identity.slot)), use_uvloop=use_uvloop)
    except ConfigError as e:
        log.error("configuration error: %s", e)
        sys.exit(2)


class Supervisor:
    """Starts, watches and stops the workers of one gateway."""

    def __init__(self, config: GatewayConfig, count: int, use_uvloop: bool) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._use_uvloop = use_uvloop
        self._count = count
        self._stopping = False
        metrics = config.telemetry
        last_metrics_port = metrics.prometheus_port + count - 1  # worker N's endpoint: prometheus_port + N
        if metrics.metrics == "prometheus" and metrics.prometheus_port and last_metrics_port > MAX_PORT:
            raise ConfigError(
                f"telemetry.prometheus_port: worker {count - 1} would serve metrics on port {last_metrics_port}"
                f" (prometheus_port + {count - 1}), over {MAX_PORT}"
            )
        self._reserved = [_reserve(config.server.host, config.server.port, "server.port")]
        port = self._reserved[0].getsockname()[1]
        admin_port = config.admin.port
        if admin_port:
            self._reserved.append(_reserve(config.server.host, admin_port, "admin.port"))
        self._config = replace(config, server=replace(config.server, port=port))
        self._workers: dict[int, _Worker] = {}
        self._draining: list[_Worker] = []  # the workers serving when a stop signal came
        self._started_ns = time.time_ns()

    def _start(self, slot: int, restarts: int) -> _Worker:
        receive, send = self._context.Pipe(duplex=False)
        identity = WorkerIdentity(slot, self._count, restarts, self._started_ns)
        process = self._context.Process(
            target=_run_worker,
            args=(self._config, identity, self._use_uvloop, send, os.getpid()),
            name=f"canary-gateway worker {slot}",
        )
        process.start()
        send.close()
        log.info("worker %d started (pid %d)", slot, process.pid)
        return _Worker(slot, process, receive, restarts)

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("%s: draining %d workers", signal.Signals(signum).name, len(self._workers))
            self._draining = [w for w in self._workers.values() if w.process.is_alive()]
        self._stopping = True
        for worker in self._workers.values():
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: the worker drains and exits 0

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        listen = address(self._config.server.host, self._config.server.port)
        log.info("supervisor: %d workers on %s", self._count, listen)
        self._workers = {slot: self._start(slot, 0) for slot in range(self._count)}
        failed = self._wait_started()
        if failed is not None:
            self._stop_all()
            return failed
        if self._stopping:
            return self._stop_all()
        log.info("listening on %s (%d workers)", listen, self._count)
        return self._watch()

    def _wait_started(self) -> int | None:
        """None when every worker serves; else the exit code of a worker that could not start."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._stopping and not all(w.is_ready for w in self._workers.values()):
            if time.monotonic() > deadline:
                log.error("workers did not become ready within %.0f s", STARTUP_TIMEOUT_S)
                return 1
            self._poll(0.2)
            for worker in self._workers.values():
                if not worker.process.is_alive() and not worker.is_ready:
                    code = worker.process.exitcode if (worker.process.exitcode or 0) > 0 else 1
                    log.error("worker %d could not start (exit code %d); stopping", worker.slot, code)
                    return code
        return None

    def _poll(self, timeout: float) -> None:
        """Wait for a worker to report ready or to exit; mark the ready ones. (A dead worker's pipe
        and sentinel stay readable: only live workers are waited on, else this would spin.)"""
        alive = [w for w in self._workers.values() if w.process.is_alive()]
        pending = {w.ready: w for w in alive if not w.is_ready}
        sentinels = [w.process.sentinel for w in alive]
        for signalled in wait([*pending, *sentinels], timeout):
            worker = pending.get(signalled)  # type: ignore[call-overload]
            if worker is None:
                continue
            try:
                worker.ready.recv()
                worker.is_ready = True
            except EOFError:  # it died first; its sentinel says so
                pass

    def _watch(self) -> int:
        """Restart workers that die until told to stop; then wait for every worker to drain."""
        failures: dict[int, int] = {}  # slot → restarts in a row that died before serving
        due: dict[int, float] = {}  # slot → when to restart it
        while not self._stopping:
            self._poll(0.2)
            now = time.monotonic()
            for slot, worker in list(self._workers.items()):
                if worker.is_ready:
                    failures.pop(slot, None)
                if worker.process.is_alive() or slot in due or self._stopping:
                    continue
                failures[slot] = failures.get(slot, 0) + (not worker.is_ready)
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** failures[slot])
                log.error(
                    "worker %d (pid %d) exited with code %s; restarting it in %.1f s",
                    slot,
                    worker.process.pid,
                    worker.process.exitcode,
                    delay,
                )
                due[slot] = now + delay
            for slot, at in list(due.items()):
                if now >= at and not self._stopping:
                    del due[slot]
                    self._workers[slot] = self._start(slot, self._workers[slot].restarts + 1)
        return self._stop_all()

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for each to drain; 0 when all exited cleanly."""
        self._stopping = True
        grace = self._config.server.grace_period_s + 30  # the drain, the log's last fsync, telemetry's flush
        # The workers that were serving when the stop began, each of which must drain and exit cleanly,
        # and any started since: a replacement whose start the stop signal interrupted was not yet in
        # `_workers` for the signal handler, so it got no SIGTERM, and would serve on (multiprocessing
        # then joins it at exit: the supervisor would hang).
        started = [w for w in self._workers.values() if w.process.is_alive() and w not in self._draining]
        stopping = [*self._draining, *started]
        for worker in stopping:
            if worker.process.is_alive():
                worker.process.terminate()
        clean = True
        for worker in stopping:
            worker.process.join(grace)
            if worker.process.is_alive():
                log.error("worker %d did not stop within %.0f s; killing it", worker.slot, grace)
                worker.process.kill()
                worker.process.join()
                clean = False
            elif worker.process.exitcode not in (0, -signal.SIGTERM):
                log.error("worker %d exited with code %s while draining", worker.slot, worker.process.exitcode)
                clean = False
        for reserved in self._reserved:
            reserved.close()
        log.info("stopped")
        return 0 if clean else 1
