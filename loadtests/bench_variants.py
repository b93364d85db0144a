"""What the request log and canary routing cost: the gateway in several configurations, in one run.

Each variant is the same gateway on the same two-version MLP repository (`mlp/1`, `mlp/2`: same
shape and cost, different weights, so an answer tells which version computed it) with its own TOML
config, environment and setup step, started pinned like bench_core (server on one CPU, load generator
on another) with a fresh state directory, and driven at concurrency 16 and 1 with the same request.
Every call carries metadata `x-user-id: user-<n>`, n cycling over 10,000 keys, in every variant: only
the sticky variant reads it, the others ignore it, so the variants differ in the gateway alone.

    single              baseline: no route, the highest version (2) serves everything; log on, sync = process
    log-off             [log] enabled = false (needs CANARY_GATEWAY_BENCHMARK=1, set for this variant only)
    log-fsync           [log] sync = "fsync"
    transport-undeferred  [server] defer_transport_threads = false (gRPC's threads may preempt the loop)
    split-90-10-sticky  SetSplit(mlp, 1=9000 2=1000) and SetSticky(mlp, x-user-id) through the admin API,
                        then checked: answers per version match the split, a key always gets the same version
    streaming           as single, but the load goes over ModelStreamInfer: one stream per generator process
                        with all of its requests in flight on it (no sticky metadata: it is per stream)
    ood                 as single, with an OOD profile beside each version: every request scored (policy flag)
    telemetry-1pct      as single, with Prometheus metrics on and 1% of requests traced over OTLP to a sink
                        (loadtests/otlp_sink.py, started on the load generator's CPU)
    traced-all          as telemetry-1pct, every request traced

The table shows throughput, latency, the server's CPU per request (from /proc/PID/stat, warm-up
included), how busy server and client were, how much of the server's and of the client's CPU other
processes took ("oth srv", "oth cli", from /proc/stat: on a shared machine, the sign that a point was
disturbed; approximate, within a few percent), which share of the load version 2 answered (from
ModelStatistics), failed calls (any status but OK), and ratios to the baseline variant (`--baseline`).
Ratios are taken within a round; `--rounds N` repeats the whole pass (rotating the variants' order, so
drift does not always favour the same one) and reports the cell-by-cell median. The issue's targets,
each judged on the median of its per-round ratios:

    single    >= 0.90 x log-off  (throughput at c16)
    log-fsync >= 0.60 x log-off  (throughput at c16; p99 of both reported)
    split-90-10-sticky >= 0.95 x single  (throughput at c16)
    streaming >= 2.0 x single  (throughput at c16; and its p50 at c1 no worse than single's)
    ood       >= 0.95 x single  (throughput at c16)
    telemetry-1pct >= 0.95 x single  (throughput at c16; traced-all is reported)

    python loadtests/bench_variants.py [--duration 6 | --requests N] [--concurrency 16] [--rounds 1]
                                       [--variants single,log-off,...] [--baseline single]
                                       [--sticky-keys 10000] [--gateway-config FILE] [--workdir DIR]
                                       [--keep-state] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
from bench_core import (
    CLOCK_TICKS,
    HERE,
    HOST,
    Placement,
    Point,
    Server,
    ServerFigures,
    choose_placement,
    gateway_argv,
    gateway_source,
    median_table,
    point_notes,
    running,
)
from floor_server import MODEL_INFER
from loadgen import LoadSpec
from models import FEATURES, MODEL_NAME, VersionedOutputCheck, build_infer_request, build_repository

from gateway.ood.profile import PROFILE_FILE, build_profile, save_profile
from gateway.protocol import Stub, admin
from gateway.protocol import inference as pb

VERSIONS = ("1", "2")
STICKY_HEADER = "x-user-id"
BENCHMARK_ENV = {"CANARY_GATEWAY_BENCHMARK": "1"}  # what lets a gateway run with the request log off
TOKEN_WAIT_S = 10.0
ROUTING_CHECK_KEYS = 2000  # distinct keys whose versions must match the split...
ROUTING_CHECK_TOLERANCE = 0.04  # ...within this share (10% expected; 2000 keys: one sigma is 0.7%)
STICKY_CHECK_KEYS, STICKY_CHECK_REPEATS = 20, 5  # a key asked again must get the same version
OTHER_LOAD_WARN = 0.10  # other processes used more than this share of the server's or client's CPU in a point


@dataclass(frozen=True)
class RouteSetup:
    """A route set through the admin API after the gateway is ready, before any load."""

    split: tuple[tuple[str, int], ...]  # (version, basis points)
    sticky_key: str

    def describe(self) -> str:
        split = " ".join(f"{v}={bps}" for v, bps in self.split)
        return f"SetSplit({MODEL_NAME}, {split}), SetSticky({MODEL_NAME}, {self.sticky_key!r})"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    config: str = ""  # gateway TOML
    env: Mapping[str, str] = field(default_factory=dict)  # added to the gateway's environment
    route: RouteSetup | None = None
    streaming: bool = False  # load over ModelStreamInfer (one stream per generator process) instead of ModelInfer
    profiled: bool = False  # serve a repository whose versions have an OOD profile (scored before the answer)

    @property
    def exports(self) -> bool:
        """Its config sends telemetry to the OTLP sink (`{otlp_endpoint}` in it)."""
        return "{otlp_endpoint}" in self.config


TELEMETRY_1PCT = """[telemetry]
metrics = "prometheus"
prometheus_port = {metrics_port}
traces = "otlp"
otlp_endpoint = "{otlp_endpoint}"
trace_sample_ratio = 0.01
"""


VARIANTS = (
    Variant("single", "no route: the highest version serves all traffic; request log on, sync = process"),
    Variant("log-off", "request log off (benchmarks only)", "[log]\nenabled = false\n", BENCHMARK_ENV),
    Variant("log-fsync", "request log with sync = fsync", '[log]\nsync = "fsync"\n'),
    Variant(
        "transport-undeferred",
        "as single, gRPC's transport threads left under the default scheduler (preempting the loop)",
        "[server]\ndefer_transport_threads = false\n",
    ),
    Variant(
        "split-90-10-sticky",
        "two versions, 90/10 split, sticky on x-user-id",
        route=RouteSetup((("1", 9000), ("2", 1000)), STICKY_HEADER),
    ),
    Variant("streaming", "as single, but the load is sent over one ModelStreamInfer stream", streaming=True),
    Variant("ood", "as single, with an OOD profile: every request scored before the answer", profiled=True),
    Variant("telemetry-1pct", "as single, Prometheus metrics on, 1% of requests traced to OTLP", TELEMETRY_1PCT),
    Variant(
        "traced-all",
        "as single, Prometheus metrics on, every request traced to OTLP",
        TELEMETRY_1PCT.replace("0.01", "1.0"),
    ),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(frozen=True)
class Target:
    """`variant` throughput at high concurrency >= `ratio` x `reference`'s (an issue target)."""

    variant: str
    reference: str
    ratio: float
    show_p99: bool = False

    @property
    def name(self) -> str:
        return f"{self.variant} / {self.reference}"


TARGETS = (
    Target("single", "log-off", 0.90),
    Target("log-fsync", "log-off", 0.60, show_p99=True),
    Target("split-90-10-sticky", "single", 0.95),
    Target("streaming", "single", 2.0),
    Target("ood", "single", 0.95),
    Target("telemetry-1pct", "single", 0.95),
)


class OtherLoad(NamedTuple):
    """Share of the server's and of the client's CPU that something else used during a point."""

    server: float | None
    client: float | None


class OtherLoadMeter:
    """Measures `OtherLoad` around one point from /proc/stat: a CPU's busy time minus what the server
    (/proc/PID/stat) or the load generator processes (reaped children, os.times) used there. Only
    meaningful when both are pinned; approximate (a generator process starts before it pins itself)."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.start = time.monotonic()
        self.server_busy = cpus_busy_s(placement.server_cpus) if placement.server_cpus else 0.0
        self.client_busy = cpus_busy_s(placement.client_cpus) if placement.client_cpus else 0.0
        self.children = _children_cpu_s()

    def finish(self, point: Point) -> OtherLoad:
        wall = time.monotonic() - self.start
        server = client = None
        if self.placement.server_cpus:
            used = cpus_busy_s(self.placement.server_cpus) - self.server_busy - point.server_cpu_s
            server = max(used, 0.0) / wall
        if self.placement.client_cpus:
            used = cpus_busy_s(self.placement.client_cpus) - self.client_busy - (_children_cpu_s() - self.children)
            client = max(used, 0.0) / wall
        return OtherLoad(server, client)


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


@dataclass(frozen=True)
class Measured:
    """One variant in one round: its two points and which versions answered the high-concurrency load."""

    figures: ServerFigures
    version_counts: dict[str, int]  # requests answered per version during the high-concurrency point
    routing_check: str | None  # what the split variant's routing check found
    other_load: tuple[OtherLoad, OtherLoad]  # (high, c1)

    @property
    def v2_share(self) -> float | None:
        total = sum(self.version_counts.values())
        return self.version_counts.get("2", 0) / total if total else None

    def to_dict(self) -> dict[str, object]:
        return {
            "high": self.figures.high.to_dict(),
            "c1": self.figures.one.to_dict(),
            "version_counts": self.version_counts,
            "routing_check": self.routing_check,
            "other_load": {"high": self.other_load[0]._asdict(), "c1": self.other_load[1]._asdict()},
        }


def version_counts(channel: grpc.Channel) -> dict[str, int]:
    """Requests (rows) answered so far by each version of the model, from ModelStatistics."""
    stats = Stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=MODEL_NAME), timeout=5).model_stats
    return {s.version: s.inference_count for s in stats}


def cpus_busy_s(cpus: frozenset[int]) -> float:
    """CPU seconds `cpus` spent busy since boot, whoever ran there (user, nice, system, irq, softirq, steal)."""
    busy = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *ticks = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                busy += sum(int(ticks[i]) for i in (0, 1, 2, 5, 6, 7))
    return busy / CLOCK_TICKS


def read_admin_token(state_dir: Path) -> str:
    """The admin token the gateway writes to `<state_dir>/admin.token` on its first start."""
    path = state_dir / "admin.token"
    deadline = time.monotonic() + TOKEN_WAIT_S
    while not path.is_file() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway wrote no admin token to {path} within {TOKEN_WAIT_S:.0f} s")
        time.sleep(0.1)
    return path.read_text().strip()


def set_route(server: Server, state_dir: Path, route: RouteSetup) -> None:
    stub = Stub(server.channel, admin.AdminService)
    auth = (("authorization", f"Bearer {read_admin_token(state_dir)}"),)
    reason = "bench_variants"
    split = [admin.VersionShare(version=v, bps=bps) for v, bps in route.split]
    stub.SetSplit(admin.SetSplitRequest(model=MODEL_NAME, split=split, reason=reason), metadata=auth, timeout=10)
    stub.SetSticky(
        admin.SetStickyRequest(model=MODEL_NAME, sticky_key=route.sticky_key, reason=reason), metadata=auth, timeout=10
    )
    (current,) = stub.GetRoutes(admin.GetRoutesRequest(model=MODEL_NAME), metadata=auth, timeout=10).routes
    got = (tuple((s.version, s.bps) for s in current.split), current.sticky_key)
    if got != (route.split, route.sticky_key):
        raise RuntimeError(f"the gateway reports route {got} after {route.describe()}")


def check_routing(server: Server, body: bytes, route: RouteSetup) -> str:
    """Make sure the route is what the load meets: versions in proportion, and sticky per key."""
    call = server.channel.unary_unary(MODEL_INFER)  # bytes in, bytes out
    check = VersionedOutputCheck(VERSIONS)

    def version_for(key: str) -> str:
        answer = call(body, metadata=((route.sticky_key, key),), timeout=5)
        if not check(answer):
            raise RuntimeError(f"{server.label}: wrong answer for {route.sticky_key}={key}")
        return str(pb.ModelInferResponse.FromString(answer).model_version)

    counts = Counter(version_for(f"user-{n}") for n in range(ROUTING_CHECK_KEYS))
    total_bps = sum(bps for _, bps in route.split)
    for version, bps in route.split:
        share, expected = counts[version] / ROUTING_CHECK_KEYS, bps / total_bps
        if abs(share - expected) > ROUTING_CHECK_TOLERANCE:
            problem = f"version {version} answered {share:.1%} of keys, expected {expected:.0%}"
            raise RuntimeError(f"{server.label}: {problem}")
    for n in range(STICKY_CHECK_KEYS):
        seen = {version_for(f"user-{n}") for _ in range(STICKY_CHECK_REPEATS)}
        if len(seen) != 1:
            raise RuntimeError(f"{server.label}: key user-{n} was answered by versions {sorted(seen)}: not sticky")
    shares = " ".join(f"{v}={counts[v] / ROUTING_CHECK_KEYS:.1%}" for v, _ in route.split)
    return (
        f"{ROUTING_CHECK_KEYS} keys: {shares}; {STICKY_CHECK_KEYS} keys x {STICKY_CHECK_REPEATS} calls: "
        "each always the same version"
    )


def filesystem_of(path: Path) -> str:
    """The filesystem type holding `path` (fsync means nothing on tmpfs)."""
    best, kind = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, mount_point, fs_type, *_ = line.split()
            if str(path.resolve()).startswith(mount_point.rstrip("/") + "/") and len(mount_point) >= len(best):
                best, kind = mount_point, fs_type
    return kind


def variant_config(variant: Variant, common: Path | None, otlp_endpoint: str = "http://127.0.0.1:4317") -> str:
    """The variant's TOML (telemetry endpoints filled in), with the --gateway-config file's appended."""
    config = variant.config.format(otlp_endpoint=otlp_endpoint, metrics_port=free_port())
    text = f"# bench_variants: {variant.name}: {variant.description}\n{config}"
    if common is not None:
        text += f"\n# from {common}\n{common.read_text()}"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"--gateway-config {common} clashes with variant {variant.name}'s config: {e}") from None
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def build_profiled_repository(root: Path) -> Path:
    """The benchmark repository with an OOD profile beside each version (training rows: standard normal,
    the distribution the benchmark request is drawn from)."""
    repository = build_repository(root, VERSIONS)
    profile = build_profile(np.random.default_rng(7).standard_normal((5000, FEATURES)))
    for version in VERSIONS:
        save_profile(profile, repository / MODEL_NAME / version / PROFILE_FILE)
    return repository


@contextmanager
def otlp_sink(placement: Placement, workdir: Path) -> Iterator[str]:
    """The OTLP sink (loadtests/otlp_sink.py) on the load generator's CPUs; yields its endpoint."""
    command = [sys.executable, str(HERE / "otlp_sink.py"), "--port", "0"]
    if placement.client_cpus:
        command += ["--cpu", ",".join(map(str, sorted(placement.client_cpus)))]
    with open(workdir / "otlp-sink.log", "w") as log:
        sink = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        assert sink.stdout is not None
        line = sink.stdout.readline()
        if not line.startswith("listening on "):
            sink.kill()
            raise SystemExit(f"the OTLP sink did not start: {line!r}; see {workdir / 'otlp-sink.log'}")
        try:
            yield "http://" + line.split()[-1]
        finally:
            sink.terminate()
            print(f"OTLP sink: {sink.communicate(timeout=10)[0].strip()}", flush=True)


@contextmanager
def variant_gateway(
    variant: Variant,
    label: str,
    state_dir: Path,
    repositories: Mapping[bool, Path],
    placement: Placement,
    workdir: Path,
    common: Path | None,
    otlp_endpoint: str,
) -> Iterator[Server]:
    """The variant's gateway, started pinned with its config and environment, ready, its route set."""
    config = workdir / f"{variant.name}.toml"
    config.write_text(variant_config(variant, common, otlp_endpoint))
    command = gateway_argv(repositories[variant.profiled])
    command += ["--state-dir", str(state_dir), "--config", str(config)]
    with running(label, command, placement, workdir, variant.env) as server:
        server.wait_ready(build_infer_request(), VersionedOutputCheck(VERSIONS))
        if variant.route is not None:
            set_route(server, state_dir, variant.route)
        yield server


def variant_load(variant: Variant, target: str, placement: Placement, sticky_keys: int, **bounds: Any) -> LoadSpec:
    """The benchmark request at `target` the variant's way (streamed or unary); `bounds`: concurrency,
    duration_s, warmup_s and the rest of LoadSpec's fields."""
    return LoadSpec(
        target=target,
        body=build_infer_request(),
        cpus=placement.client_cpus,
        sticky_keys=0 if variant.streaming else sticky_keys,  # a stream's metadata is per stream
        sticky_header=STICKY_HEADER,
        streaming=variant.streaming,
        **bounds,
    )


def run_variant(
    variant: Variant,
    args: argparse.Namespace,
    placement: Placement,
    workdir: Path,
    repositories: Mapping[bool, Path],
    number: int,
    otlp_endpoint: str,
) -> Measured:
    body = build_infer_request()
    state_dir = workdir / f"state-r{number}-{variant.name}"
    label = f"{variant.name} r{number}"
    routing_check = None
    with variant_gateway(
        variant, label, state_dir, repositories, placement, workdir, args.gateway_config, otlp_endpoint
    ) as server:
        if variant.route is not None:
            routing_check = check_routing(server, body, variant.route)
            print(f"{variant.name}: {variant.route.describe()}; routing check: {routing_check}", flush=True)
        points: list[Point] = []
        other_load: list[OtherLoad] = []
        counts: dict[str, int] = {}
        for concurrency in (args.concurrency, 1):
            spec = variant_load(
                variant,
                server.target,
                placement,
                args.sticky_keys,
                concurrency=concurrency,
                processes=args.processes,
                duration_s=args.duration,
                requests=args.requests,
                warmup_s=args.warmup,
            )
            before = version_counts(server.channel)
            meter = OtherLoadMeter(placement)
            point = server.drive(spec)
            other_load.append(meter.finish(point))
            if concurrency == args.concurrency:
                after = version_counts(server.channel)
                counts = {v: after[v] - before.get(v, 0) for v in sorted(after)}
            points.append(point)
            load = point.load
            print(
                f"{variant.name} c{concurrency}: {load.throughput:.0f} req/s, p50 {load.latency.p50_us} us, "
                f"p99 {load.latency.p99_us} us, server {point.server_us_per_request:.0f} us CPU/request, "
                f"errors {sum(load.errors.values())}",
                flush=True,
            )
    if not args.keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return Measured(ServerFigures(points[0], points[1]), counts, routing_check, (other_load[0], other_load[1]))


Table = dict[str, list[float | None]]  # variant -> one value per column


def columns(concurrency: int, baseline: str) -> list[tuple[str, str]]:
    """(heading, format) of each table column."""
    c = f"c{concurrency}"
    return [
        (f"req/s {c}", ".0f"),
        (f"x {baseline}", ".2f"),
        (f"p50 {c}", ".0f"),
        (f"p99 {c}", ".0f"),
        ("p50 c1", ".0f"),
        ("p99 c1", ".0f"),
        ("srv us/req", ".1f"),
        (f"us/req x {baseline}", ".2f"),
        ("srv busy", ".0%"),
        ("cli busy", ".0%"),
        ("oth srv", ".0%"),
        ("oth cli", ".0%"),
        ("v2 share", ".1%"),
        ("errors", ".0f"),
    ]


THROUGHPUT, P99_HIGH, P99_C1, ERRORS = 0, 3, 5, 13  # column indexes


@dataclass(frozen=True)
class Round:
    number: int
    order: list[str]  # the order the variants ran in
    variants: dict[str, Measured]

    def table(self, baseline: str) -> Table:
        base = self.variants[baseline].figures.high
        table: Table = {}
        for name, measured in self.variants.items():
            high, one = measured.figures.high, measured.figures.one
            table[name] = [
                high.load.throughput,
                high.load.throughput / base.load.throughput if base.load.throughput else None,
                high.load.latency.p50_us,
                high.load.latency.p99_us,
                one.load.latency.p50_us,
                one.load.latency.p99_us,
                high.server_us_per_request,
                high.server_us_per_request / base.server_us_per_request if base.server_us_per_request else None,
                high.server_util,
                high.client_util,
                measured.other_load[0].server,
                measured.other_load[0].client,
                measured.v2_share,
                sum(high.load.errors.values()) + sum(one.load.errors.values()),
            ]
        return table

    def target_ratios(self) -> dict[str, float]:
        """Each target's throughput ratio in this round (targets whose variants both ran)."""
        ratios = {}
        for target in TARGETS:
            if target.variant in self.variants and target.reference in self.variants:
                reference = self.variants[target.reference].figures.high.load.throughput
                value = self.variants[target.variant].figures.high.load.throughput
                ratios[target.name] = value / reference if reference else 0.0
        return ratios

    def notes(self) -> list[str]:
        """What a reader needs to trust (or distrust) this round's table."""
        notes = [f"order: {', '.join(self.order)}"]
        for name, measured in self.variants.items():
            shares = ", ".join(f"{v}: {n}" for v, n in measured.version_counts.items())
            notes.append(f"{name} at high concurrency: requests per version {{{shares}}}")
            points = (("high concurrency", measured.figures.high), ("c1", measured.figures.one))
            for (point_name, point), other in zip(points, measured.other_load, strict=True):
                for side, share in other._asdict().items():
                    if share is not None and share > OTHER_LOAD_WARN:
                        notes.append(
                            f"WARNING {name} at {point_name}: other processes used {share:.0%} of the {side}'s CPU: "
                            "the machine was not quiet"
                        )
                notes.extend(point_notes(name, point_name, point))
        return notes


def format_table(table: Table, concurrency: int, baseline: str) -> str:
    cols = columns(concurrency, baseline)
    cells = [["variant", *(heading for heading, _ in cols)]]
    for row, row_values in table.items():
        values = zip(row_values, (fmt for _, fmt in cols), strict=True)
        cells.append([row, *("-" if v is None else format(v, fmt) for v, fmt in values)])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def verdicts(summary: Table, ratios: dict[str, float], concurrency: int) -> list[str]:
    """The issue's targets, judged on the median of each target's per-round ratio."""
    outcome = []
    for target in TARGETS:
        if target.name not in ratios:
            continue
        ratio = ratios[target.name]
        line = (
            f"{target.variant} throughput / {target.reference} at c{concurrency}: {ratio:.2f} "
            f"(target >= {target.ratio:.2f}): "
        )
        errors = sum(summary[name][ERRORS] or 0 for name in (target.variant, target.reference))
        if errors:
            line += f"INVALID ({errors:.0f} failed calls, see the errors column)"
        else:
            line += "met" if ratio >= target.ratio else "MISSED"
        if target.show_p99:
            p99 = ", ".join(
                f"{name} {summary[name][P99_HIGH]:.0f} us at c{concurrency} / {summary[name][P99_C1]:.0f} us at c1"
                for name in (target.variant, target.reference)
            )
            line += f"; p99: {p99}"
        outcome.append(line)
    return outcome


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="the gateway in several configurations (log, routing), in one run")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, default=6.0, help="measured seconds per point (default 6)")
    bound.add_argument("--requests", type=int, help="measured requests per point instead of a duration")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each point, not measured")
    parser.add_argument("--concurrency", type=int, default=16, help="the high-concurrency point (c1 is always run)")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes (all on the client CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; the summary is the median round")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS_BY_NAME),
        help=f"comma-separated subset of {', '.join(VARIANTS_BY_NAME)} (default: all)",
    )
    parser.add_argument("--baseline", default="single", help="the variant ratios are taken to (default single)")
    parser.add_argument(
        "--sticky-keys",
        type=int,
        default=10_000,
        help=f"distinct {STICKY_HEADER} values the load cycles over, in every variant (0: no metadata)",
    )
    parser.add_argument(
        "--gateway-config",
        type=Path,
        help="TOML appended to every variant's config, e.g. [model_defaults] batching keys (no [log] table)",
    )
    parser.add_argument("--workdir", type=Path, help="where state (request logs) and server logs go (default: /tmp)")
    parser.add_argument("--keep-state", action="store_true", help="keep each variant's state directory")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.requests is not None:
        args.duration = None  # a request count replaces the default duration
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS_BY_NAME]
    if unknown or not names:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS_BY_NAME)}")
    if args.baseline not in names:
        parser.error(f"--baseline {args.baseline} is not among --variants {','.join(names)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    selected = [VARIANTS_BY_NAME[n] for n in VARIANTS_BY_NAME if n in names]  # declaration order
    if args.gateway_config is not None:
        if not args.gateway_config.is_file():
            parser.error(f"--gateway-config {args.gateway_config}: no such file")
        for variant in selected:
            variant_config(variant, args.gateway_config)  # fail now, not after the first variants ran

    placement = choose_placement()
    source = gateway_source()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-variants-", dir=args.workdir))
    filesystem = filesystem_of(workdir)
    print(f"placement: {placement.description}\ngateway: {source}", flush=True)
    print(f"state directories under {workdir} ({filesystem})", flush=True)
    if filesystem in ("tmpfs", "ramfs"):
        print("WARNING: the request logs are on a RAM filesystem: fsync costs nothing there (see --workdir)")
    repositories = {False: build_repository(workdir / "models", VERSIONS)}
    if any(v.profiled for v in selected):
        repositories[True] = build_profiled_repository(workdir / "models-profiled")

    rounds: list[Round] = []
    with ExitStack() as stack:
        endpoint = stack.enter_context(otlp_sink(placement, workdir)) if any(v.exports for v in selected) else ""
        for number in range(1, args.rounds + 1):
            shift = (number - 1) % len(selected)
            order = selected[shift:] + selected[:shift]
            print(f"\n== round {number} of {args.rounds}", flush=True)
            measured = {v.name: run_variant(v, args, placement, workdir, repositories, number, endpoint) for v in order}
            this = Round(number, [v.name for v in order], {v.name: measured[v.name] for v in selected})
            rounds.append(this)
            print(f"\n{format_table(this.table(args.baseline), args.concurrency, args.baseline)}", flush=True)
            print("\n".join(this.notes()), flush=True)

    summary = median_table([r.table(args.baseline) for r in rounds])
    ratios = {name: statistics.median(r.target_ratios()[name] for r in rounds) for name in rounds[0].target_ratios()}
    if len(rounds) > 1:
        print(f"\n== median of {len(rounds)} rounds\n{format_table(summary, args.concurrency, args.baseline)}")
    outcome = verdicts(summary, ratios, args.concurrency)
    print("\n" + "\n".join(outcome))
    print(f"placement: {placement.description}; gateway: {source}; configs and server logs in {workdir}")
    if args.json is not None:
        report = {
            "placement": placement.description,
            "gateway": source,
            "state_filesystem": filesystem,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "variants": {
                v.name: {
                    "description": v.description,
                    "config": v.config,
                    "env": dict(v.env),
                    "route": v.route.describe() if v.route else None,
                }
                for v in selected
            },
            "columns": [heading for heading, _ in columns(args.concurrency, args.baseline)],
            "summary": summary,
            "target_ratios": ratios,
            "verdicts": outcome,
            "rounds": [
                {
                    "number": r.number,
                    "order": r.order,
                    "variants": {k: m.to_dict() for k, m in r.variants.items()},
                    "table": r.table(args.baseline),
                    "target_ratios": r.target_ratios(),
                    "notes": r.notes(),
                }
                for r in rounds
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
