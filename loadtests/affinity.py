"""CPU pinning for benchmark processes.

A server and its load generator sharing a core measure each other's scheduling, not the server, so
every process in loadtests/ can be pinned. `os.sched_setaffinity(0, ...)` pins only the calling
thread and the threads it starts later, so callers pin first, before grpc or onnxruntime start
theirs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection


def parse_cpus(text: str) -> frozenset[int]:
    """`"1"`, `"0,2"` or `"2-3"` (as taskset -c takes them) -> a set of CPU numbers."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"CPU list {text!r}: expected e.g. 1 or 0,2 or 2-3") from None
    if not cpus:
        raise argparse.ArgumentTypeError(f"CPU list {text!r} is empty")
    return frozenset(cpus)


def pin(cpus: Collection[int] | None) -> None:
    """Pin the calling thread (and threads it starts from now on) to `cpus`; None leaves it free."""
    if cpus:
        os.sched_setaffinity(0, cpus)
