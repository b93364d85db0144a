"""Using every core: the gateway with 1 and 2 worker processes in one run, and per worker core.

Three setups of the same gateway (bench_core's MLP repository, request log on), each driven closed-loop
at `--concurrency` with the load spread over `--connections` connections per load generator process
(the kernel gives each connection to one worker, so a 2-worker gateway needs several):

    shared 1 worker    serve --workers 1; gateway and load generator unpinned, sharing every core
    shared 2 workers   serve --workers 2; the same
    pinned 1 worker    serve --workers 1 pinned to one CPU, load generator on another: req/s per worker core

Scaling efficiency = (shared 2 workers) / (2 x shared 1 worker). On a 2-core machine it cannot come
near 1: the load generator needs about as much CPU per request as a worker, and in the shared setups it
runs on the same two cores, so one worker already has most of a core and the generator the other;
a second worker can only take CPU from the generator. "pinned 1 worker" is the honest per-core figure.
Server CPU is summed over the supervisor and its workers; "others" is the CPU other processes (other
tenants of a shared machine, the load generator's parent) took meanwhile, from /proc/stat.
`--rounds N` repeats the three (rotating the order) and reports each round and the median of the ratios.

    python loadtests/bench_workers.py [--duration 6] [--warmup 2] [--concurrency 16] [--processes 2]
                                      [--connections 8] [--rounds 3] [--gateway-config FILE] [--json FILE]

With `--gateway-config` holding `[log] sync = "fsync"` it shows group commit across workers: every
worker's syncer fsyncs the one live segment, and one fsync covers every process's commits before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_core import Placement, Point, choose_placement, gateway_argv, gateway_source, running
from bench_variants import cpus_busy_s
from loadgen import LoadSpec
from models import OutputCheck, build_infer_request, build_repository

ALL_CPUS = frozenset(os.sched_getaffinity(0))
SETUPS = ("shared 1 worker", "shared 2 workers", "pinned 1 worker")


def measure(setup: str, args: argparse.Namespace, repository: Path, workdir: Path, number: int) -> Point:
    workers = 2 if "2 workers" in setup else 1
    pinned = choose_placement()
    placement = pinned if setup.startswith("pinned") else Placement(None, None, "unpinned")
    state = workdir / f"state-{setup.replace(' ', '-')}-{number}"
    argv = [*gateway_argv(repository, workers), "--state-dir", str(state)]
    if args.gateway_config is not None:
        argv += ["--config", str(args.gateway_config.resolve())]
    body, check = build_infer_request(), OutputCheck()
    with running(f"{setup} r{number}", argv, placement, workdir) as server:
        server.wait_ready(body, check)
        spec = LoadSpec(
            target=server.target,
            body=body,
            concurrency=args.concurrency,
            processes=args.processes,
            connections=args.connections,
            duration_s=args.duration,
            warmup_s=args.warmup,
            cpus=placement.client_cpus,
        )
        busy_before = cpus_busy_s(ALL_CPUS)
        point = server.drive(spec)
        others = cpus_busy_s(ALL_CPUS) - busy_before - point.server_cpu_s - point.load.client_cpu_s
    load = point.load
    print(
        f"  {setup:17} {load.throughput:8.0f} req/s  p50 {load.latency.p50_us:6} us  p99 {load.latency.p99_us:6} us  "
        f"server {point.server_us_per_request:4.0f} us CPU/req ({point.server_util:.2f} cores)  "
        f"client {point.client_util:.2f} cores  others {max(0.0, others) / load.wall_s:.2f} cores  "
        f"errors {sum(load.errors.values())}",
        flush=True,
    )
    return point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gateway throughput with 1 and 2 workers, and per worker core")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per setup")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--connections", type=int, default=8, help="connections per load generator process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateway-config", type=Path, help='gateway TOML, e.g. [log] sync = "fsync"')
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    repository = build_repository(workdir / "models")
    print(f"gateway: {gateway_source()}; pinned setup: {choose_placement().description}", flush=True)
    rounds: list[dict[str, Point]] = []
    for number in range(1, args.rounds + 1):
        order = SETUPS[number % len(SETUPS) :] + SETUPS[: number % len(SETUPS)]
        print(f"round {number}: {', '.join(order)}", flush=True)
        rounds.append({setup: measure(setup, args, repository, workdir, number) for setup in order})
    speedups = [r["shared 2 workers"].load.throughput / r["shared 1 worker"].load.throughput for r in rounds]
    print("\nround  1 worker  2 workers  2w/1w  efficiency  pinned 1 worker (per core)")
    for number, (r, speedup) in enumerate(zip(rounds, speedups, strict=True), 1):
        one, two, core = (r[s].load.throughput for s in SETUPS)
        print(f"{number:5}  {one:8.0f}  {two:9.0f}  {speedup:5.2f}  {speedup / 2:10.2f}  {core:8.0f}")
    median = statistics.median(speedups)
    print(f"median 2 workers / 1 worker: {median:.2f}x, scaling efficiency {median / 2:.2f}")
    if args.json is not None:
        report = {
            "gateway": gateway_source(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rounds": [{setup: point.to_dict() for setup, point in r.items()} for r in rounds],
            "speedups": speedups,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
