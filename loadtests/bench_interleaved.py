"""Two gateway configurations measured side by side: both running at once, load alternating between them.

On a shared machine a neighbour can take a third of a core for a few seconds and then leave, so
variants measured one after the other (bench_variants) differ by more than the few percent some
targets are about. Here both gateways (any two of bench_variants' variants) start first, pinned to
the same server CPU, each with its own state directory; the load generator (on the other CPU) then
drives them in short windows in ABBA order (A B, B A, A B, ...), so each pair of windows sees nearly
the same machine, and the verdict is the median of the per-pair throughput ratios. The idle gateway
only ticks in the background (worker board, route poll, exporters), for both alike.
The same variant twice (`--variants single,single`, the second labelled `single'`) is the A/A
control: its spread and its distance from 1.0 are what this method cannot resolve on this machine.

    python loadtests/bench_interleaved.py --variants single,telemetry-1pct [--pairs 20] [--window 2]
                                          [--warmup 0.5] [--concurrency 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from abba import abba, quartiles
from bench_core import choose_placement, gateway_source
from bench_variants import (
    TARGETS,
    VARIANTS_BY_NAME,
    VERSIONS,
    Variant,
    build_profiled_repository,
    otlp_sink,
    variant_gateway,
    variant_load,
)
from models import build_repository


def target_ratio(candidate: str, baseline: str) -> float | None:
    """The issue's target for candidate / baseline throughput, if there is one."""
    return next((t.ratio for t in TARGETS if (t.variant, t.reference) == (candidate, baseline)), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="two gateway configurations, load alternating between them")
    parser.add_argument("--variants", default="single,telemetry-1pct", help="BASELINE,CANDIDATE from bench_variants")
    parser.add_argument("--pairs", type=int, default=20, help="window pairs (ABBA order)")
    parser.add_argument("--window", type=float, default=2.0, help="measured seconds per window")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before each window, not measured")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sticky-keys", type=int, default=10_000)
    parser.add_argument("--json", type=Path, help="also write every window to this file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",")]
    if len(names) != 2 or any(n not in VARIANTS_BY_NAME for n in names):
        parser.error(f"--variants: two of {', '.join(VARIANTS_BY_NAME)}")
    if args.pairs < 1 or args.window <= 0:
        parser.error("--pairs must be at least 1 and --window positive")
    baseline, candidate = (VARIANTS_BY_NAME[n] for n in names)
    if candidate.name == baseline.name:
        candidate = replace(candidate, name=candidate.name + "'")
    placement = choose_placement()
    workdir = Path(tempfile.mkdtemp(prefix="bench-interleaved-"))
    print(f"placement: {placement.description}\ngateway: {gateway_source()}", flush=True)
    repositories = {False: build_repository(workdir / "models", VERSIONS)}
    if baseline.profiled or candidate.profiled:
        repositories[True] = build_profiled_repository(workdir / "models-profiled")

    with ExitStack() as stack:
        endpoint = stack.enter_context(otlp_sink(placement, workdir)) if baseline.exports or candidate.exports else ""
        servers = {
            v.name: stack.enter_context(
                variant_gateway(
                    v, v.name, workdir / f"state-{v.name}", repositories, placement, workdir, None, endpoint
                )
            )
            for v in (baseline, candidate)
        }

        def window(variant: Variant) -> tuple[float, float]:
            """(throughput, server µs of CPU per request) of one window on `variant`'s gateway."""
            spec = variant_load(
                variant,
                servers[variant.name].target,
                placement,
                args.sticky_keys,
                concurrency=args.concurrency,
                duration_s=args.window,
                warmup_s=args.warmup,
            )
            point = servers[variant.name].drive(spec)
            errors = sum(point.load.errors.values())
            if errors:
                raise RuntimeError(f"{variant.name}: {errors} failed calls in a window: {point.load.errors}")
            return point.load.throughput, point.server_us_per_request

        windows: list[dict[str, Any]] = []
        for number, order in abba(args.pairs, baseline, candidate):
            figures = {v.name: window(v) for v in order}
            (base_rate, base_us), (cand_rate, cand_us) = figures[baseline.name], figures[candidate.name]
            windows.append({"pair": number, "order": [v.name for v in order], **figures})
            print(
                f"pair {number:3}: {baseline.name} {base_rate:7.0f} req/s {base_us:5.0f} us/req   "
                f"{candidate.name} {cand_rate:7.0f} req/s {cand_us:5.0f} us/req   ratio {cand_rate / base_rate:.3f}",
                flush=True,
            )

    ratios = [w[candidate.name][0] / w[baseline.name][0] for w in windows]
    cpu_ratios = [w[baseline.name][1] / w[candidate.name][1] for w in windows]
    low, median, high = quartiles(ratios)
    target = target_ratio(candidate.name, baseline.name)
    verdict = "" if target is None else f" (target >= {target}: {'met' if median >= target else 'missed'})"
    print(f"\n{candidate.name} / {baseline.name} throughput at c{args.concurrency}, {len(ratios)} pairs:")
    print(f"  median {median:.3f}{verdict}; quartiles {low:.3f} .. {high:.3f}")
    print(f"  pooled {sum(w[candidate.name][0] for w in windows) / sum(w[baseline.name][0] for w in windows):.3f}")
    print(f"  server CPU per request, {baseline.name} / {candidate.name}: median {statistics.median(cpu_ratios):.3f}")
    print(f"configs and server logs in {workdir}")
    if args.json is not None:
        report = {"gateway": gateway_source(), "settings": vars(args) | {"json": str(args.json)}, "windows": windows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
