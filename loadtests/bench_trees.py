"""The same gateway from two source trees, measured side by side: did a change make it faster?

Both gateways (this checkout and `--baseline`, another checkout, e.g. an older commit made with
`git worktree add /tmp/old <rev>` and built with `python setup.py build_ext --inplace`) serve the
benchmark MLP with default settings, both pinned to the server CPU. The load generator drives them in
ABBA windows (see bench_interleaved.py for why), and the verdict is the median of per-pair ratios:
throughput, server CPU per request and p50 latency, this tree's over the baseline's.

    python loadtests/bench_trees.py --baseline /tmp/old [--pairs 10] [--concurrency 16] [--window 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from abba import abba, quartiles
from bench_core import Point, choose_placement, gateway_argv, running
from loadgen import LoadSpec
from models import build_infer_request, build_repository

HERE = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="this checkout's gateway against another's, side by side")
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (extensions built)")
    parser.add_argument("--pairs", type=int, default=10, help="window pairs (ABBA order)")
    parser.add_argument("--window", type=float, default=2.0, help="measured seconds per window")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before each window, not measured")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if not (args.baseline / "gateway" / "__init__.py").is_file():
        parser.error(f"--baseline: {args.baseline} is not a checkout of this project")
    if args.pairs < 1 or args.window <= 0:
        parser.error("--pairs must be at least 1 and --window positive")
    placement = choose_placement()
    workdir = Path(tempfile.mkdtemp(prefix="bench-trees-"))
    repository = build_repository(workdir / "models")
    body = build_infer_request(1)
    trees = {"this": HERE, "baseline": args.baseline.resolve()}
    print(f"placement: {placement.description}; this: {HERE}; baseline: {trees['baseline']}", flush=True)
    with ExitStack() as stack:
        servers = {}
        for label, tree in trees.items():
            (workdir / label).mkdir()
            server = running(label, gateway_argv(repository), placement, workdir / label, env={"PYTHONPATH": str(tree)})
            servers[label] = stack.enter_context(server)
            servers[label].wait_ready(body, lambda _: True)
        throughput, cpu, p50 = [], [], []
        for number, order in abba(args.pairs, servers["this"], servers["baseline"]):
            points: dict[str, Point] = {}
            for server in order:
                spec = LoadSpec(
                    target=server.target,
                    body=body,
                    concurrency=args.concurrency,
                    duration_s=args.window,
                    warmup_s=args.warmup,
                    cpus=placement.client_cpus,
                )
                points[server.label] = server.drive(spec)
            this, baseline = points["this"], points["baseline"]
            throughput.append(this.load.throughput / baseline.load.throughput)
            cpu.append(this.server_us_per_request / baseline.server_us_per_request)
            p50.append(this.load.latency.p50_us / baseline.load.latency.p50_us)
            print(
                f"pair {number:3d}: this {this.load.throughput:,.0f} req/s, p50 {this.load.latency.p50_us} us, "
                f"{this.server_us_per_request:.0f} us CPU/request; baseline {baseline.load.throughput:,.0f} req/s, "
                f"p50 {baseline.load.latency.p50_us} us, {baseline.server_us_per_request:.0f} us CPU/request",
                flush=True,
            )
    print(f"\nthis / baseline at c{args.concurrency}, {args.pairs} pairs (median; quartiles):")
    for name, ratios in (("throughput", throughput), ("server CPU per request", cpu), ("p50 latency", p50)):
        low, median, high = quartiles(ratios)
        print(f"  {name}: {median:.3f} ({low:.3f} .. {high:.3f})")
    print(f"server logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
