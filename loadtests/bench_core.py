"""The performance budget in one run: the gateway against its floors, on this machine, now.

Absolute numbers on shared machines drift from run to run, so the budget is stated in ratios measured
in one sitting: onnxruntime called directly (the model's cost), a bare grpc.aio echo server (the
transport's cost), a minimal V2 server (parse, run, answer) and the gateway, each server pinned to one
CPU with the load generator pinned to another, each driven at concurrency 16 and 1 with the same
request. Besides throughput and latency, the table shows the server's CPU per request (from
/proc/PID/stat, warm-up included) and how busy server and client were: a ratio only means something
when the server, not the Python client, was the one running out of CPU. The machine itself drifts
within minutes, so `--rounds N` repeats the whole pass and reports the cell-by-cell median, each ratio
taken within its own round.

    python loadtests/bench_core.py [--duration 10 | --requests N] [--concurrency 16] [--rounds 1]
                                   [--gateway-config FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import grpc
from floor_server import MODEL_INFER
from loadgen import LoadResult, LoadSpec, run_load
from models import MODEL_NAME, OutputCheck, build_infer_request, build_repository, model_path
from ort_direct import DirectResult, measure

from gateway.protocol import Stub
from gateway.protocol import inference as pb

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TARGET_ECHO_RATIO = 0.85  # gateway throughput at high concurrency, as a fraction of the echo floor's
TARGET_C1_EXTRA_US = 20  # gateway p50 at concurrency 1 may exceed the minimal V2 server's by this much
CLIENT_BOUND_UTIL = 0.9  # above this the client, not the server, may be what limits throughput


@dataclass(frozen=True)
class Placement:
    server_cpus: frozenset[int] | None
    client_cpus: frozenset[int] | None
    description: str


def choose_placement() -> Placement:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return Placement(None, None, f"only {len(available)} CPU available: NOT pinned, server and client share it")
    server, client = available[:2]
    description = f"server on CPU {server}, load generator on CPU {client}"
    return Placement(frozenset({server}), frozenset({client}), description)


@dataclass(frozen=True)
class Point:
    """One server driven at one concurrency."""

    load: LoadResult
    server_cpu_s: float
    rows_per_run: float | None  # requests per onnxruntime run, where the server reports statistics

    @property
    def server_us_per_request(self) -> float:
        return self.server_cpu_s * 1e6 / self.load.sent if self.load.sent else 0.0

    @property
    def server_util(self) -> float:
        return self.server_cpu_s / self.load.wall_s if self.load.wall_s else 0.0

    @property
    def client_util(self) -> float:
        return self.load.client_cpu_s / self.load.wall_s if self.load.wall_s else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "server_us_per_request": round(self.server_us_per_request, 1),
            "server_util": round(self.server_util, 3),
            "client_util": round(self.client_util, 3),
        }


@dataclass(frozen=True)
class ServerFigures:
    high: Point  # at --concurrency
    one: Point  # at concurrency 1


def gateway_source() -> str:
    """Which gateway code is measured (the one `python -m gateway` imports): path and git revision."""
    spec = importlib.util.find_spec("gateway")
    assert spec is not None and spec.origin is not None, "the gateway package is not importable"
    root = Path(spec.origin).resolve().parent.parent
    try:
        describe = ["git", "-C", str(root), "describe", "--always", "--dirty"]
        revision = subprocess.run(describe, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{root} (not a git checkout)"
    return f"{root} at {revision}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()  # fields from 3 (state) on; the name may hold spaces


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads and its live descendants included (the workers
    of `serve --workers N` are children of its supervisor)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))  # ppid
            except OSError:
                continue  # exited while we looked
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = _stat_fields(current)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)
        pending.extend(children.get(current, []))
    return total


def model_statistics(channel: grpc.Channel) -> tuple[int, int] | None:
    """(requests, onnxruntime runs) so far, or None when the server does not implement statistics."""
    try:
        stats = Stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=MODEL_NAME), timeout=5).model_stats
    except grpc.RpcError:
        return None
    return sum(s.inference_count for s in stats), sum(s.execution_count for s in stats)


class Server:
    """A server process under test: started pinned, waited for, checked once, stopped with SIGTERM."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        cpus: frozenset[int] | None,
        workdir: Path,
        env: Mapping[str, str] | None = None,  # added to (not replacing) this process's environment
    ) -> None:
        self.label = label
        port = free_port()
        self.target = f"{HOST}:{port}"
        # taskset pins before the interpreter starts, so every thread the server starts inherits it;
        # the gateway has no pinning option of its own, and all servers are started the same way.
        pinned = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
        self.log_path = workdir / f"{label.replace(' ', '_')}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*pinned, *argv, "--port", str(port)],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env} if env else None,
            )
        self.channel = grpc.insecure_channel(self.target)

    def _fail(self, problem: str) -> RuntimeError:
        tail = "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
        return RuntimeError(f"{self.label}: {problem}; last lines of {self.log_path}:\n{tail}")

    def wait_ready(self, body: bytes, check: Callable[[bytes], bool]) -> None:
        """Wait for ServerReady to say ready, then make sure the benchmark request gets the right answer."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        stub = Stub(self.channel)
        while True:
            if self.process.poll() is not None:
                raise self._fail(f"exited with code {self.process.returncode} before becoming ready")
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    break
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise self._fail(f"not ready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        try:
            answer = self.channel.unary_unary(MODEL_INFER)(body, timeout=5)
        except grpc.RpcError as e:
            raise self._fail(f"the benchmark request failed: {e.code().name} {e.details()}") from None
        if not check(answer):
            raise self._fail("the benchmark request got a wrong answer")

    def drive(self, spec: LoadSpec) -> Point:
        before_stats = model_statistics(self.channel)
        before_cpu = cpu_seconds(self.process.pid)
        load = run_load(spec)
        server_cpu_s = cpu_seconds(self.process.pid) - before_cpu
        after_stats = model_statistics(self.channel)
        rows_per_run = None
        if before_stats is not None and after_stats is not None and after_stats[1] > before_stats[1]:
            rows_per_run = round((after_stats[0] - before_stats[0]) / (after_stats[1] - before_stats[1]), 2)
        return Point(load, round(server_cpu_s, 2), rows_per_run)

    def stop(self) -> None:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            print(f"  {self.label} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s and was killed", flush=True)
            return
        if code != 0:
            print(f"  {self.label} exited with code {code} on SIGTERM (see {self.log_path})", flush=True)


@contextmanager
def running(
    label: str, argv: list[str], placement: Placement, workdir: Path, env: Mapping[str, str] | None = None
) -> Iterator[Server]:
    server = Server(label, argv, placement.server_cpus, workdir, env)
    try:
        yield server
    finally:
        server.stop()


def gateway_argv(repository: Path, workers: int = 1) -> list[str]:
    """`canary-gateway serve` on `repository` (without --port), one worker unless told otherwise."""
    return [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--workers",
        str(workers),
        "--model-repository",
        str(repository),
    ] + [
        "--host",
        HOST,
    ]


def server_commands(repository: Path, gateway_config: Path | None) -> list[tuple[str, list[str]]]:
    """(label, argv without --port) for each server, in the order they are measured."""
    python = sys.executable
    gateway = gateway_argv(repository)
    if gateway_config is not None:
        gateway += ["--config", str(gateway_config.resolve())]
    minimal = [python, str(HERE / "minimal_v2_server.py"), "--model-repository", str(repository), "--host", HOST]
    return [
        ("echo floor", [python, str(HERE / "echo_server.py"), "--host", HOST]),
        ("minimal V2", minimal),
        ("gateway", gateway),
    ]


def measure_direct(repository: Path, seconds: float, placement: Placement) -> DirectResult:
    """Floor (a), in its own process so it can be pinned to the server's CPU without pinning us."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, model_path(repository), seconds, placement.server_cpus).result()


ROWS = ("onnxruntime direct", "echo floor", "minimal V2", "gateway")
Table = dict[str, list[float | None]]  # row label -> one value per column, None where it does not apply


def columns(concurrency: int) -> list[tuple[str, str]]:
    """(heading, format) of each table column."""
    c = f"c{concurrency}"
    return [
        (f"req/s {c}", ".0f"),
        ("x echo", ".2f"),
        ("x minV2", ".2f"),
        (f"p50 {c}", ".0f"),
        (f"p99 {c}", ".0f"),
        ("p50 c1", ".0f"),
        ("p99 c1", ".0f"),
        ("srv us/req", ".1f"),
        ("cpu x echo", ".2f"),
        ("srv busy", ".0%"),
        ("cli busy", ".0%"),
        ("errors", ".0f"),
    ]


@dataclass(frozen=True)
class Round:
    """Every figure of one pass over onnxruntime direct and the three servers."""

    direct: DirectResult
    servers: dict[str, ServerFigures]

    def table(self) -> Table:
        echo, minimal = self.servers["echo floor"].high, self.servers["minimal V2"].high
        direct = self.direct
        table: Table = {
            # Direct calls have no concurrency; their latency is one run's, shown under c1.
            "onnxruntime direct": [
                direct.calls_per_s,
                direct.calls_per_s / echo.load.throughput,
                direct.calls_per_s / minimal.load.throughput,
                None,
                None,
                direct.latency.p50_us,
                direct.latency.p99_us,
                direct.us_per_call,
                echo.server_us_per_request / direct.us_per_call,
                None,
                None,
                None,
            ]
        }
        for label, figures in self.servers.items():
            high, one = figures.high, figures.one
            table[label] = [
                high.load.throughput,
                high.load.throughput / echo.load.throughput,
                high.load.throughput / minimal.load.throughput,
                high.load.latency.p50_us,
                high.load.latency.p99_us,
                one.load.latency.p50_us,
                one.load.latency.p99_us,
                high.server_us_per_request,
                echo.server_us_per_request / high.server_us_per_request,
                high.server_util,
                high.client_util,
                sum(high.load.errors.values()) + sum(one.load.errors.values()),
            ]
        return table

    def notes(self) -> list[str]:
        """What a reader needs to trust (or distrust) this round's table."""
        notes = []
        for label, figures in self.servers.items():
            for name, point in (("high concurrency", figures.high), ("c1", figures.one)):
                notes.extend(point_notes(label, name, point))
        return notes


def point_notes(label: str, name: str, point: Point) -> list[str]:
    """Batching achieved, a client that may have been the bottleneck, errors: for one measured point."""
    notes = []
    if point.rows_per_run is not None:
        notes.append(f"{label} at {name}: {point.rows_per_run} requests per onnxruntime run")
    if point.client_util > CLIENT_BOUND_UTIL and point.client_util > point.server_util:
        notes.append(
            f"WARNING {label} at {name}: client {point.client_util:.0%} busy vs server "
            f"{point.server_util:.0%}: the client may have limited throughput"
        )
    if point.load.errors or point.load.truncated:
        problem = f"errors {point.load.errors}" + (", truncated" if point.load.truncated else "")
        notes.append(f"WARNING {label} at {name}: {problem}")
    return notes


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_table(tables: list[Table]) -> Table:
    """Cell by cell median; ratios are taken within each round first, so drift between rounds cancels."""
    return {row: [_median(list(cells)) for cells in zip(*(t[row] for t in tables), strict=True)] for row in tables[0]}


def format_table(table: Table, concurrency: int) -> str:
    cols = columns(concurrency)
    cells = [["row", *(heading for heading, _ in cols)]]
    for row in ROWS:
        values = zip(table[row], (fmt for _, fmt in cols), strict=True)
        cells.append([row, *("-" if v is None else format(v, fmt) for v, fmt in values)])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def verdicts(table: Table) -> list[str]:
    """The two targets of the performance budget, judged on `table`."""
    x_echo, p50_c1 = 1, 5  # column indexes
    ratio = table["gateway"][x_echo]
    gateway_p50, minimal_p50 = table["gateway"][p50_c1], table["minimal V2"][p50_c1]
    assert ratio is not None and gateway_p50 is not None and minimal_p50 is not None
    limit_us = minimal_p50 + TARGET_C1_EXTRA_US
    return [
        f"gateway throughput / echo floor at high concurrency: {ratio:.2f} (target >= {TARGET_ECHO_RATIO}): "
        + ("met" if ratio >= TARGET_ECHO_RATIO else "MISSED"),
        f"gateway p50 at c1: {gateway_p50:.0f} us (target <= minimal V2 p50 {minimal_p50:.0f} + "
        f"{TARGET_C1_EXTRA_US} = {limit_us:.0f} us): " + ("met" if gateway_p50 <= limit_us else "MISSED"),
    ]


def run_round(args: argparse.Namespace, placement: Placement, workdir: Path, repository: Path) -> Round:
    body, check = build_infer_request(), OutputCheck()
    direct = measure_direct(repository, args.direct_seconds, placement)
    print(f"onnxruntime direct: {direct.us_per_call} us per run, {direct.calls_per_s:.0f} runs/s", flush=True)
    servers: dict[str, ServerFigures] = {}
    for label, command in server_commands(repository, args.gateway_config):
        with running(label, command, placement, workdir) as server:
            server.wait_ready(body, check)
            points = []
            for concurrency in (args.concurrency, 1):
                spec = LoadSpec(
                    target=server.target,
                    body=body,
                    concurrency=concurrency,
                    processes=args.processes,
                    duration_s=args.duration,
                    requests=args.requests,
                    warmup_s=args.warmup,
                    cpus=placement.client_cpus,
                )
                point = server.drive(spec)
                points.append(point)
                print(
                    f"{label} c{concurrency}: {point.load.throughput:.0f} req/s, p50 {point.load.latency.p50_us} us, "
                    f"p99 {point.load.latency.p99_us} us, server {point.server_us_per_request:.0f} us CPU/request",
                    flush=True,
                )
        servers[label] = ServerFigures(points[0], points[1])
    return Round(direct, servers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="gateway vs onnxruntime, echo and minimal V2 floors, in one run")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, default=10.0, help="measured seconds per point (default 10)")
    bound.add_argument("--requests", type=int, help="measured requests per point instead of a duration")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each point, not measured")
    parser.add_argument("--concurrency", type=int, default=16, help="the high-concurrency point (c1 is always run)")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes (all on the client CPU)")
    parser.add_argument("--direct-seconds", type=float, default=3.0, help="how long to time onnxruntime directly")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; the summary is the median round")
    parser.add_argument("--gateway-config", type=Path, help="gateway TOML config, e.g. [model_defaults] batching keys")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests is not None:
        args.duration = None  # a request count replaces the default duration
    if args.gateway_config is not None and not args.gateway_config.is_file():
        raise SystemExit(f"--gateway-config {args.gateway_config}: no such file")
    placement = choose_placement()
    source = gateway_source()
    print(f"placement: {placement.description}\ngateway: {source}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-core-"))
    repository = build_repository(workdir / "models")

    rounds: list[Round] = []
    for number in range(1, args.rounds + 1):
        print(f"\n== round {number} of {args.rounds}", flush=True)
        rounds.append(run_round(args, placement, workdir, repository))
        print(f"\n{format_table(rounds[-1].table(), args.concurrency)}\n" + "\n".join(rounds[-1].notes()), flush=True)

    summary = median_table([r.table() for r in rounds])
    if len(rounds) > 1:
        print(f"\n== median of {len(rounds)} rounds\n{format_table(summary, args.concurrency)}")
    outcome = verdicts(summary)
    print("\n" + "\n".join(outcome))
    print(f"placement: {placement.description}; gateway: {source}; server logs in {workdir}")
    if args.json is not None:
        report = {
            "placement": placement.description,
            "gateway": source,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "columns": [heading for heading, _ in columns(args.concurrency)],
            "summary": summary,
            "verdicts": outcome,
            "rounds": [
                {
                    "onnxruntime_direct": r.direct.to_dict(),
                    "servers": {k: {"high": s.high.to_dict(), "c1": s.one.to_dict()} for k, s in r.servers.items()},
                    "table": r.table(),
                    "notes": r.notes(),
                }
                for r in rounds
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
