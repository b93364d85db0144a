"""Streaming against unary with Triton's own C++ client: `perf_analyzer` with and without `--streaming`.

The Python load generator costs about as much CPU per message as the gateway does per streamed
message, so with it on the other core streaming looks capped near 1.5x unary: the client, not the
server, runs out. perf_analyzer (C++, installed by loadtests/install_perf_analyzer.sh) leaves the
gateway its core. The gateway (one worker, pinned to one CPU; perf_analyzer on the other) serves the
benchmark MLP; each round measures, in a rotating order, unary and streaming at `--concurrency`
(16 requests in flight) and at concurrency 1, and reports throughput, p50 and p99 as perf_analyzer
measured them, the TCP connections to the gateway during the run (from `ss`; one is the benchmark's
own idle channel), and the per-round ratios with their median. The issue's targets: streaming >= 2x
unary at concurrency 16; streaming p50 at concurrency 1 no worse than unary's. The minimal V2 floor
(bench_core's, running beside the gateway on the same CPU) is measured unary at concurrency 1 in the
same rotation: the core issue's c1 target, gateway p50 <= minimal V2 p50 + 20 us, as perf_analyzer
measures it. So is a third server, the gateway with its request log off (`[log] enabled = false`, a
benchmark-only setting): the difference between the two gateways is what committing each request's
record to LMDB before its answer costs at concurrency 1.

    python loadtests/bench_perf_analyzer.py [--rounds 3] [--interval-ms 4000] [--concurrency 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench_core import (
    HERE,
    TARGET_C1_EXTRA_US,
    choose_placement,
    gateway_argv,
    gateway_source,
    running,
    server_commands,
)
from bench_variants import BENCHMARK_ENV
from models import MODEL_NAME, OutputCheck, build_infer_request, build_repository

PERF_ANALYZER = HERE / "perf_analyzer"
FIGURES = {
    "throughput": re.compile(r"Throughput: ([\d.]+) infer/sec"),
    "p50_us": re.compile(r"p50 latency: (\d+) usec"),
    "p99_us": re.compile(r"p99 latency: (\d+) usec"),
}


def connections(port: int) -> int:
    """Established TCP connections to the gateway's port right now."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=False
    ).stdout
    return len(out.splitlines())


def perf_analyzer(target: str, concurrency: int, streaming: bool, interval_ms: int, cpus: str) -> dict[str, float]:
    args = ["taskset", "-c", cpus, str(PERF_ANALYZER), "-m", MODEL_NAME, "-i", "grpc", "-u", target]
    args += ["--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms)]
    args += ["--stability-percentage", "1000", "--max-trials", "3"]  # a noisy shared machine: measure, don't tune
    args += ["--streaming"] if streaming else []
    seen: list[int] = []
    port = int(target.rpartition(":")[2])
    sampler = threading.Timer(interval_ms / 1000, lambda: seen.append(connections(port)))
    sampler.start()
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    sampler.cancel()
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}):\n{output[-2000:]}")
    figures = {name: float(pattern.findall(output)[-1]) for name, pattern in FIGURES.items()}
    figures["connections"] = seen[0] if seen else -1
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="streaming vs unary, measured with Triton's perf_analyzer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer's measurement window")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    placement = choose_placement()
    client_cpus = ",".join(map(str, sorted(placement.client_cpus or [])))
    if not client_cpus:
        raise SystemExit("needs two CPUs: the gateway on one, perf_analyzer on the other")
    workdir = Path(tempfile.mkdtemp(prefix="bench-pa-"))
    repository = build_repository(workdir / "models")
    print(f"gateway: {gateway_source()}; {placement.description}", flush=True)
    points = [("gateway", c, s) for c in (args.concurrency, 1) for s in (False, True)]
    points += [("minimal V2", 1, False), ("gateway, log off", 1, False)]
    rounds = []
    minimal = dict(server_commands(repository, None))["minimal V2"]
    gateway = [*gateway_argv(repository), "--state-dir", str(workdir / "state")]
    log_off_config = workdir / "log-off.toml"
    log_off_config.write_text("[log]\nenabled = false\n")
    log_off = [*gateway_argv(repository), "--state-dir", str(workdir / "state-off"), "--config", str(log_off_config)]
    with (
        running("gateway", gateway, placement, workdir) as server,
        running("minimal-v2", minimal, placement, workdir) as floor,
        running("gateway-log-off", log_off, placement, workdir, BENCHMARK_ENV) as unlogged,
    ):
        servers = {"gateway": server, "minimal V2": floor, "gateway, log off": unlogged}
        for each in servers.values():
            each.wait_ready(build_infer_request(), OutputCheck())
        for number in range(1, args.rounds + 1):
            order = points[number % len(points) :] + points[: number % len(points)]
            figures = {}
            for name, concurrency, streaming in order:
                point = perf_analyzer(servers[name].target, concurrency, streaming, args.interval_ms, client_cpus)
                label = f"{'streaming' if streaming else 'unary'} c{concurrency}"
                label = label if name == "gateway" else f"{name} {label}"
                figures[label] = point
                print(
                    f"round {number} {label:24} {point['throughput']:8.0f} infer/s  p50 {point['p50_us']:6.0f} us  "
                    f"p99 {point['p99_us']:6.0f} us  connections {point['connections']:.0f}",
                    flush=True,
                )
            rounds.append(figures)
    c = args.concurrency
    speedups = [r[f"streaming c{c}"]["throughput"] / r[f"unary c{c}"]["throughput"] for r in rounds]
    p50_ratios = [r["streaming c1"]["p50_us"] / r["unary c1"]["p50_us"] for r in rounds]
    c1_gaps = [r["unary c1"]["p50_us"] - r["minimal V2 unary c1"]["p50_us"] for r in rounds]
    log_off_gaps = [r["gateway, log off unary c1"]["p50_us"] - r["minimal V2 unary c1"]["p50_us"] for r in rounds]
    print(f"\nstreaming / unary throughput at c{c}: " + ", ".join(f"{x:.2f}" for x in speedups))
    print(f"  median {statistics.median(speedups):.2f}x (target >= 2)")
    print("streaming / unary p50 at c1: " + ", ".join(f"{x:.2f}" for x in p50_ratios))
    print(f"  median {statistics.median(p50_ratios):.2f} (target <= 1)")
    print("gateway unary p50 at c1 minus minimal V2's, us: " + ", ".join(f"{x:+.0f}" for x in c1_gaps))
    print(f"  median {statistics.median(c1_gaps):+.0f} us (target <= +{TARGET_C1_EXTRA_US})")
    print("the same with the gateway's request log off, us: " + ", ".join(f"{x:+.0f}" for x in log_off_gaps))
    print(f"  median {statistics.median(log_off_gaps):+.0f} us (the rest of the gap is the log's commit)")
    if args.json is not None:
        report = {
            "gateway": gateway_source(),
            "rounds": rounds,
            "speedups": speedups,
            "p50_ratios": p50_ratios,
            "c1_gaps_us": c1_gaps,
            "c1_gaps_log_off_us": log_off_gaps,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
