"""Routing decision cost: native (Cython) against the pure-Python reference, keyed and unkeyed.

Justifies `native/routing.pyx` (DESIGN: a native module needs a benchmark showing it beats the
reference). Two levels are timed: the split alone (hash + weighted pick + shadow draws, the part that
is native) and the whole `RouteTable.decide` a request pays, with the split compiled natively or by
the reference. The route is a 90/10 split with a 5% shadow, as a canary in progress; keys are 10,000
distinct user ids, cycled. Each figure is the best of several repeats of a loop over the keys (the
loop's own cost, ~15 ns, included): the minimum is the least noisy estimate on a shared machine.
Targets (issue 3): native decision <= 1 us, and >= 3x faster than the reference.

    python loadtests/bench_routing.py [--number 100000] [--repeat 15] [--cpu N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

from native.routing import Split
from router.bucketing import ReferenceSplit, salt_for
from router.rules import Route, StickyKey, parse_shadows, parse_split
from router.table import RouteTable, Splitter

MODEL = "credit"
VERSIONS = ("1", "2", "3")
TARGET_NATIVE_US = 1.0
TARGET_SPEEDUP = 3.0


@dataclass(frozen=True)
class Row:
    case: str
    reference_us: float
    native_us: float

    @property
    def speedup(self) -> float:
        return self.reference_us / self.native_us


def best_us(reference: Callable[[int], None], native: Callable[[int], None], number: int, repeat: int) -> Row:
    """Best time per call of each over `repeat` alternating runs (so load bursts hit both alike), in µs."""
    counts = {"reference": max(number // 10, 1000), "native": number}  # the reference is ~10x slower
    best = {"reference": float("inf"), "native": float("inf")}
    for run in (reference, native):
        run(10_000)  # warm caches and the CPU clock
    for _ in range(repeat):
        for impl, run in (("reference", reference), ("native", native)):
            start = time.perf_counter_ns()
            run(counts[impl])
            best[impl] = min(best[impl], (time.perf_counter_ns() - start) / counts[impl] / 1000)
    return Row("", best["reference"], best["native"])


def keyed_loop(call: Callable[[str], object], keys: list[str]) -> Callable[[int], None]:
    def run(number: int) -> None:
        n = len(keys)
        for i in range(number):
            call(keys[i % n])

    return run


def unkeyed_loop(call: Callable[[], object]) -> Callable[[int], None]:
    def run(number: int) -> None:
        for _ in range(number):
            call()

    return run


def measure(number: int, repeat: int) -> list[Row]:
    route = Route(split=parse_split("1=90 2=10"), sticky_key=StickyKey.parse("x-user-id"), shadows=parse_shadows("3=5"))
    keys = [f"user-{i:08d}" for i in range(10_000)]
    shadows = [(v, bps, salt_for(MODEL, "shadow", v)) for v, bps in route.shadows]
    splits: dict[str, Splitter] = {
        "reference": ReferenceSplit(route.split, salt_for(MODEL), shadows),
        "native": Split(route.split, salt_for(MODEL), shadows),
    }
    tables = {
        "reference": RouteTable({MODEL: route}, split_type=ReferenceSplit),
        "native": RouteTable({MODEL: route}, split_type=Split),
    }

    cases: dict[str, Callable[[str], Callable[[int], None]]] = {
        "split, keyed (hash + pick + shadow)": lambda impl: keyed_loop(splits[impl].outcome, keys),
        "split, unkeyed (random + pick + shadow)": lambda impl: unkeyed_loop(splits[impl].outcome_random),
        "RouteTable.decide, keyed": lambda impl: keyed_loop(partial(tables[impl].decide, MODEL, VERSIONS), keys),
        "RouteTable.decide, unkeyed": lambda impl: unkeyed_loop(partial(tables[impl].decide, MODEL, VERSIONS, None)),
    }
    return [
        replace(best_us(loop("reference"), loop("native"), number, repeat), case=case) for case, loop in cases.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=100_000, help="calls per repeat (reference: a tenth)")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    rows = measure(args.number, args.repeat)
    print(f"{'case':<42} {'reference µs':>13} {'native µs':>10} {'speedup':>8}")
    for row in rows:
        print(f"{row.case:<42} {row.reference_us:>13.3f} {row.native_us:>10.3f} {row.speedup:>7.1f}×")
    decisions = [row for row in rows if row.case.startswith("RouteTable")]
    met = all(r.native_us <= TARGET_NATIVE_US and r.speedup >= TARGET_SPEEDUP for r in decisions)
    worst = max(r.native_us for r in decisions)
    slowest = min(r.speedup for r in decisions)
    print(
        f"target: native decision <= {TARGET_NATIVE_US} µs and >= {TARGET_SPEEDUP}× the reference: "
        f"{'met' if met else 'NOT met'} (worst {worst:.3f} µs, {slowest:.1f}×)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "speedup": r.speedup} for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
