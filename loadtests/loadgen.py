"""Closed-loop gRPC load generator: N processes x M concurrent callers, one pre-serialized request.

Why it looks like this: a Python client is cheap to run next to the server but must not become the
thing measured. So the request body is serialized once and sent as bytes through a channel method
with no serializers (the client pays no protobuf cost per call unless `check` asks it to parse the
answer), every process runs uvloop, and processes scale the client past one core's GIL when cores
allow. Because it sends bytes to any unary method path, the same generator drives the echo floor,
the minimal V2 server and the gateway.

Every run is bounded: a time-based warm-up excluded from the figures, then either a fixed duration
or a fixed request count (cut off, and marked truncated, at `max_seconds`). Latencies go into one HDR
histogram per process, merged exactly at the end; failures are counted by gRPC status code.

With `streaming`, each process opens one ModelStreamInfer stream (one connection) and keeps its
callers' share of requests in flight on it: a closed loop where each answer sends that slot's next
request. Each slot's request carries its own id (`lg-<slot>`), which the answer echoes, so latency
is measured per request even when answers come back out of order.

With `rate_per_s` > 0 the load is open-loop instead: requests leave at that rate whatever the answers
(at most `concurrency` outstanding; a request due beyond that counts as `CLIENT_BACKLOG`), and
latency runs from each request's scheduled time, so a client that falls behind does not hide the
server's delay. That is how an overload is offered: a closed loop slows down with its server.

With `tls`, calls go over TLS (and mTLS when it carries a client key and certificate).

For sticky routing, `sticky_keys` > 0 sends metadata `<sticky_header>: user-<n>` with every call,
cycling n over that many distinct keys (each process from its own offset). The metadata objects are
built once, so a call pays one list index for its key.

    python loadtests/loadgen.py --target 127.0.0.1:8001 --concurrency 16 --duration 10 --cpu 1
    python loadtests/loadgen.py --target 127.0.0.1:8001 --sticky-keys 10000   # x-user-id: user-0 .. user-9999
    python loadtests/loadgen.py --target 127.0.0.1:8001 --streaming --concurrency 16
    python loadtests/loadgen.py --target 127.0.0.1:8001 --rate 1500 --concurrency 1000   # open loop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import queue
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import grpc
import uvloop
from affinity import parse_cpus, pin
from floor_server import MODEL_INFER, SERVICE
from hdrh.histogram import HdrHistogram
from latency import Latency, new_histogram, record_ns
from models import MODEL_NAME, OutputCheck, build_infer_request

from gateway.protocol import inference as pb

MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
INVALID_RESPONSE = "INVALID_RESPONSE"  # counted like a status code when `check` rejects an answer
CLIENT_BACKLOG = "CLIENT_BACKLOG"  # open loop: a request was due while `concurrency` were outstanding


@dataclass(frozen=True)
class ClientTls:
    """PEM bytes for a TLS channel: the CA to trust, and for mTLS the client's key and certificate."""

    root_certificates: bytes
    private_key: bytes | None = None
    certificate_chain: bytes | None = None


CONNECT_TIMEOUT_S = 30.0
REPORT_POLL_S = 0.5


@dataclass(frozen=True)
class LoadSpec:
    """One load run. Exactly one of `duration_s` and `requests` bounds the measured part."""

    target: str
    body: bytes
    method: str = MODEL_INFER
    concurrency: int = 16  # total closed-loop callers, spread over the processes
    processes: int = 1
    duration_s: float | None = 10.0
    requests: int | None = None
    warmup_s: float = 3.0
    max_seconds: float = 300.0  # bounds a fixed-request-count run that the server cannot finish
    rpc_timeout_s: float = 10.0
    check: Callable[[bytes], bool] | None = None  # must be picklable: it travels to the processes
    cpus: frozenset[int] | None = None  # pin the generator's processes here
    sticky_keys: int = 0  # > 0: every call carries metadata `sticky_header: user-<n>`, n cycling over this many
    sticky_header: str = "x-user-id"
    streaming: bool = False  # ModelStreamInfer: one stream per process carrying its callers' requests
    rate_per_s: float = 0.0  # > 0: open loop at this total rate; concurrency bounds the outstanding calls
    tls: ClientTls | None = None
    connections: int = 1  # per process: closed-loop callers spread over this many connections (SO_REUSEPORT
    # gives each connection to one worker, so a multi-worker gateway needs several to use all of them)

    def __post_init__(self) -> None:
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("give exactly one of duration_s and requests")
        if self.concurrency < 1 or self.processes < 1:
            raise ValueError("concurrency and processes must be at least 1")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.sticky_keys < 0:
            raise ValueError("sticky_keys must be at least 0")
        if not self.sticky_header or self.sticky_header != self.sticky_header.lower():
            raise ValueError(f"sticky_header {self.sticky_header!r}: gRPC metadata keys are non-empty lowercase")
        if self.streaming and (self.sticky_keys or self.method != MODEL_INFER):
            raise ValueError("streaming sends ModelStreamInfer without per-call metadata: no sticky_keys or method")
        if self.rate_per_s < 0 or (self.rate_per_s and self.streaming):
            raise ValueError("rate_per_s: must not be negative, and open loop is for unary calls")


def sticky_metadata(spec: LoadSpec) -> list[grpc.aio.Metadata]:
    """The metadata of each distinct sticky key, built once: `[(header, "user-0")], [(header, "user-1")], ...`."""
    return [grpc.aio.Metadata((spec.sticky_header, f"user-{n}")) for n in range(spec.sticky_keys)]


@dataclass(frozen=True)
class LoadResult:
    target: str
    method: str
    concurrency: int
    processes: int
    ok: int  # successful calls in the measured window
    errors: dict[str, int]  # failed calls in the measured window, by status code name
    elapsed_s: float  # the measured window
    throughput: float  # successful calls per second in the measured window
    latency: Latency  # of successful calls in the measured window
    sent: int  # every call made, warm-up included
    wall_s: float  # the whole run, warm-up included (longest process)
    client_cpu_s: float  # CPU the generator's processes used during the whole run
    truncated: bool  # a fixed-count run hit max_seconds before sending every request
    streaming: bool

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Report:
    """What one generator process sends back (monotonic clock times are comparable across processes)."""

    histogram: bytes
    ok: int
    errors: dict[str, int]
    measure_start_ns: int
    last_end_ns: int
    sent: int
    wall_s: float
    cpu_s: float
    truncated: bool


class _ClosedLoop:
    """The callers of one process and their shared tallies; one event loop, so no locks."""

    def __init__(self, spec: LoadSpec, requests: int | None, first_key: int = 0) -> None:
        self.spec = spec
        self.metadata = sticky_metadata(spec)
        self.next_key = first_key % spec.sticky_keys if spec.sticky_keys else 0
        self.start_ns = time.monotonic_ns()
        self.measure_start_ns = self.start_ns + int(spec.warmup_s * 1e9)
        measured_s = spec.duration_s if spec.duration_s is not None else spec.max_seconds
        self.stop_ns = self.measure_start_ns + int(measured_s * 1e9)
        self.tickets = requests  # measured calls left to make; None in a fixed-duration run
        self.histogram = new_histogram()
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.last_end_ns = self.measure_start_ns
        self.truncated = False

    def _admit(self, now_ns: int) -> bool | None:
        """May a caller send now? None: stop; False: yes, in the warm-up; True: yes, measured."""
        if now_ns >= self.stop_ns:
            self.truncated = bool(self.tickets)
            return None
        if now_ns < self.measure_start_ns:
            return False
        if self.tickets is None:
            return True
        if self.tickets == 0:
            return None
        self.tickets -= 1
        return True

    async def caller(self, call: grpc.aio.UnaryUnaryMultiCallable) -> None:
        body, timeout, check = self.spec.body, self.spec.rpc_timeout_s, self.spec.check
        keys = self.metadata
        while True:
            start = time.monotonic_ns()
            measured = self._admit(start)
            if measured is None:
                return
            metadata = None
            if keys:
                metadata = keys[self.next_key]
                self.next_key = (self.next_key + 1) % len(keys)
            try:
                response = await call(body, timeout=timeout, metadata=metadata)
                status = None if check is None or check(response) else INVALID_RESPONSE
            except grpc.aio.AioRpcError as e:
                status = e.code().name
            self._tally(measured, start, status)

    def _tally(self, measured: bool, start_ns: int, status: str | None) -> None:
        end = time.monotonic_ns()
        self.sent += 1
        if not measured:
            return
        self.last_end_ns = max(self.last_end_ns, end)
        if status is None:
            self.ok += 1
            record_ns(self.histogram, end - start_ns)
        else:
            self.errors[status] += 1

    async def open_loop(self, call: grpc.aio.UnaryUnaryMultiCallable, rate_per_s: float, max_outstanding: int) -> None:
        """Send at `rate_per_s` whatever the answers; each latency runs from the request's scheduled time."""
        body, timeout = self.spec.body, self.spec.rpc_timeout_s
        interval_ns = int(1e9 / rate_per_s)
        outstanding: set[asyncio.Task[None]] = set()

        async def one(scheduled_ns: int, measured: bool) -> None:
            try:
                await call(body, timeout=timeout)
                status = None
            except grpc.aio.AioRpcError as e:
                status = e.code().name
            self._tally(measured, scheduled_ns, status)

        due_ns = time.monotonic_ns()
        while True:
            now = time.monotonic_ns()
            if due_ns > now:
                await asyncio.sleep((due_ns - now) / 1e9)
                continue
            measured = self._admit(due_ns)
            if measured is None:
                break
            if len(outstanding) >= max_outstanding:
                self._tally(measured, due_ns, CLIENT_BACKLOG)
            else:
                task = asyncio.get_running_loop().create_task(one(due_ns, measured))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
            due_ns += interval_ns
        if outstanding:
            await asyncio.gather(*outstanding)

    async def stream(self, call: grpc.aio.StreamStreamMultiCallable, slots: int) -> None:
        """`slots` requests in flight on one stream; each answer sends its slot's next request."""
        bodies = [_with_id(self.spec.body, f"lg-{slot}") for slot in range(slots)]
        started = [0] * slots
        measured = [False] * slots
        check = self.spec.check
        stream = call()

        async def send(slot: int) -> bool:
            start = time.monotonic_ns()
            admitted = self._admit(start)
            if admitted is None:
                return False
            started[slot], measured[slot] = start, admitted
            await stream.write(bodies[slot])
            return True

        in_flight = 0
        for slot in range(slots):
            in_flight += await send(slot)
        while in_flight:
            reply = await asyncio.wait_for(stream.read(), self.spec.rpc_timeout_s)
            if reply is grpc.aio.EOF:
                raise RuntimeError(f"the stream ended with {in_flight} requests unanswered")
            answer = pb.ModelStreamInferResponse.FromString(reply)
            slot = int(answer.infer_response.id.removeprefix("lg-"))
            if answer.error_message:
                status: str | None = answer.error_message.partition(":")[0]
            elif check is not None and not check(answer.infer_response.SerializeToString()):
                status = INVALID_RESPONSE
            else:
                status = None
            self._tally(measured[slot], started[slot], status)
            in_flight -= 1
            in_flight += await send(slot)
        await stream.done_writing()

    def report(self, cpu_s: float) -> _Report:
        return _Report(
            histogram=self.histogram.encode(),
            ok=self.ok,
            errors=dict(self.errors),
            measure_start_ns=self.measure_start_ns,
            last_end_ns=self.last_end_ns,
            sent=self.sent,
            wall_s=(time.monotonic_ns() - self.start_ns) / 1e9,
            cpu_s=cpu_s,
            truncated=self.truncated,
        )


def _with_id(body: bytes, request_id: str) -> bytes:
    request = pb.ModelInferRequest.FromString(body)
    request.id = request_id
    return bytes(request.SerializeToString())


OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # else channels to one target share a connection


def _channel(spec: LoadSpec) -> grpc.aio.Channel:
    if spec.tls is None:
        return grpc.aio.insecure_channel(spec.target, options=OWN_CONNECTION)
    credentials = grpc.ssl_channel_credentials(
        spec.tls.root_certificates, spec.tls.private_key, spec.tls.certificate_chain
    )
    return grpc.aio.secure_channel(spec.target, credentials, options=OWN_CONNECTION)


async def _drive(spec: LoadSpec, callers: int, requests: int | None, barrier: Barrier, first_key: int) -> _Report:
    async with contextlib.AsyncExitStack() as stack:
        count = 1 if spec.streaming or spec.rate_per_s else max(1, min(spec.connections, callers))
        channels = [await stack.enter_async_context(_channel(spec)) for _ in range(count)]
        channel = channels[0]
        for each in channels:
            await asyncio.wait_for(each.channel_ready(), CONNECT_TIMEOUT_S)
        barrier.wait(CONNECT_TIMEOUT_S)  # every process starts its clock together
        cpu_start = time.process_time()
        loop = _ClosedLoop(spec, requests, first_key)
        if spec.streaming:  # no serializers: bytes in, bytes out
            await loop.stream(channel.stream_stream(MODEL_STREAM_INFER), callers)
        elif spec.rate_per_s:
            share = spec.rate_per_s * callers / spec.concurrency
            await loop.open_loop(channel.unary_unary(spec.method), share, callers)
        else:
            calls = [each.unary_unary(spec.method) for each in channels]
            await asyncio.gather(*(loop.caller(calls[i % len(calls)]) for i in range(callers)))
        return loop.report(time.process_time() - cpu_start)


def _process_main(
    spec: LoadSpec, callers: int, requests: int | None, barrier: Barrier, results: Queue, first_key: int
) -> None:
    try:
        pin(spec.cpus)
        results.put(uvloop.run(_drive(spec, callers, requests, barrier, first_key)))
    except BaseException:
        barrier.abort()  # release the other processes instead of letting them wait out the timeout
        results.put(traceback.format_exc())


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _merge(spec: LoadSpec, processes: int, reports: list[_Report]) -> LoadResult:
    histogram: HdrHistogram = new_histogram()
    errors: Counter[str] = Counter()
    for report in reports:
        histogram.decode_and_add(report.histogram)
        errors.update(report.errors)
    ok = sum(r.ok for r in reports)
    elapsed_s = (max(r.last_end_ns for r in reports) - min(r.measure_start_ns for r in reports)) / 1e9
    return LoadResult(
        target=spec.target,
        method=spec.method,
        concurrency=spec.concurrency,
        processes=processes,
        ok=ok,
        errors=dict(errors),
        elapsed_s=round(elapsed_s, 3),
        throughput=round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        latency=Latency.of(histogram),
        sent=sum(r.sent for r in reports),
        wall_s=round(max(r.wall_s for r in reports), 3),
        client_cpu_s=round(sum(r.cpu_s for r in reports), 3),
        truncated=any(r.truncated for r in reports),
        streaming=spec.streaming,
    )


def _collect(results: Queue, workers: Sequence[BaseProcess], deadline: float) -> list[_Report]:
    """One report per worker; fail as soon as one reports a failure or dies without reporting."""
    reports: list[_Report] = []
    while len(reports) < len(workers):
        try:
            outcome = results.get(timeout=REPORT_POLL_S)
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead and results.empty():
                raise RuntimeError(f"a load generator process died (exit code {dead[0]}) without reporting") from None
            if time.monotonic() > deadline:
                raise TimeoutError("load generator processes did not report by their deadline") from None
            continue
        if isinstance(outcome, str):
            raise RuntimeError(f"a load generator process failed:\n{outcome}")
        reports.append(outcome)
    return reports


def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load described by `spec` in fresh processes and return the merged figures."""
    # spawn, not fork: the caller may already hold grpc channels, whose threads do not survive a fork.
    context = multiprocessing.get_context("spawn")
    processes = min(spec.processes, spec.concurrency)
    requests = _split(spec.requests, processes) if spec.requests is not None else [None] * processes
    barrier = context.Barrier(processes)
    results: Queue = context.Queue()
    # Each process starts its sticky keys at its own offset, so processes do not send the same key together.
    first_keys = [i * spec.sticky_keys // processes for i in range(processes)]
    workers = [
        context.Process(target=_process_main, args=(spec, callers, share, barrier, results, first), daemon=True)
        for callers, share, first in zip(_split(spec.concurrency, processes), requests, first_keys, strict=True)
    ]
    for worker in workers:
        worker.start()
    measured_s = spec.duration_s if spec.duration_s is not None else spec.max_seconds
    deadline = time.monotonic() + 2 * CONNECT_TIMEOUT_S + spec.warmup_s + measured_s + spec.rpc_timeout_s
    try:
        reports = _collect(results, workers, deadline)
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
    return _merge(spec, processes, reports)


def format_result(result: LoadResult) -> str:
    lat = result.latency
    errors = ", ".join(f"{code} {n}" for code, n in sorted(result.errors.items())) or "none"
    cpu = 100 * result.client_cpu_s / result.wall_s if result.wall_s else 0.0
    method = MODEL_STREAM_INFER if result.streaming else result.method
    return (
        f"{result.target}{method}  concurrency {result.concurrency} in {result.processes} process(es)\n"
        f"  throughput {result.throughput:.0f} req/s ({result.ok} ok in {result.elapsed_s:.2f} s"
        f"{', TRUNCATED at max-seconds' if result.truncated else ''})\n"
        f"  latency us: p50 {lat.p50_us}  p90 {lat.p90_us}  p99 {lat.p99_us}  max {lat.max_us}  mean {lat.mean_us}\n"
        f"  errors: {errors}\n"
        f"  client CPU {cpu:.0f}% of one core over {result.wall_s:.1f} s ({result.sent} calls incl. warm-up)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="closed-loop gRPC load generator (bytes in, bytes out)")
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--method", default=MODEL_INFER, help=f"full method path (default {MODEL_INFER})")
    body = parser.add_mutually_exclusive_group()
    body.add_argument("--body", type=Path, help="file holding the serialized request (default: the MLP request)")
    body.add_argument("--model", default=MODEL_NAME, help="model_name in the default MLP request")
    parser.add_argument("--check", action="store_true", help="check every answer carries the MLP's expected output")
    parser.add_argument("--concurrency", type=int, default=16, help="total closed-loop callers")
    parser.add_argument("--processes", type=int, default=1)
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    bound.add_argument("--requests", type=int, help="measured request count")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load excluded from the figures")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound on a --requests run")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline in seconds")
    parser.add_argument("--cpu", type=parse_cpus, help="pin the generator to these CPUs, e.g. 1")
    parser.add_argument(
        "--sticky-keys", type=int, default=0, help="send metadata STICKY_HEADER: user-<n>, n cycling over this many"
    )
    parser.add_argument("--sticky-header", default="x-user-id", help="metadata key of --sticky-keys")
    parser.add_argument(
        "--streaming", action="store_true", help="send over ModelStreamInfer: one stream per process, all in flight"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="open loop: requests per second in total (--concurrency: most outstanding)",
    )
    parser.add_argument(
        "--connections", type=int, default=1, help="per process: spread the callers over this many connections"
    )
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check and args.body is not None:
        parser.error("--check knows only the MLP's answer; it cannot check a --body request")
    spec = LoadSpec(
        target=args.target,
        body=args.body.read_bytes() if args.body is not None else build_infer_request(model_name=args.model),
        method=args.method,
        concurrency=args.concurrency,
        processes=args.processes,
        duration_s=None if args.requests is not None else args.duration,
        requests=args.requests,
        warmup_s=args.warmup,
        max_seconds=args.max_seconds,
        rpc_timeout_s=args.timeout,
        check=OutputCheck() if args.check else None,
        cpus=args.cpu,
        sticky_keys=args.sticky_keys,
        sticky_header=args.sticky_header,
        streaming=args.streaming,
        rate_per_s=args.rate,
        connections=args.connections,
    )
    result = run_load(spec)
    print(format_result(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0 if result.ok and not result.errors and not result.truncated else 1


if __name__ == "__main__":
    sys.exit(main())
