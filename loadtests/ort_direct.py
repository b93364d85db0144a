"""Floor (a), the model's own cost: onnxruntime `session.run` on the batch-1 request in a tight loop.

No server and no event loop: this is what one inference costs when nothing else happens, the
number every server's per-request cost is compared against.

    python loadtests/ort_direct.py --seconds 3 --cpu 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from affinity import parse_cpus, pin
from latency import Latency, new_histogram, record_ns
from models import INPUT_NAME, OUTPUT_NAME, build_repository, model_path, open_session, sample_input

WARMUP_RUNS = 1000


@dataclass(frozen=True)
class DirectResult:
    calls: int
    elapsed_s: float
    calls_per_s: float
    us_per_call: float  # exact, unlike the histogram's whole microseconds
    latency: Latency  # of each `run`, timed on its own

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def measure(path: Path, seconds: float, cpus: frozenset[int] | None = None) -> DirectResult:
    """Time `session.run` on the batch-1 input for `seconds`, after a warm-up excluded from the figures."""
    pin(cpus)  # before the session starts onnxruntime's threads
    session = open_session(path)
    feeds = {INPUT_NAME: sample_input()}
    outputs = [OUTPUT_NAME]
    for _ in range(WARMUP_RUNS):
        session.run(outputs, feeds)
    histogram = new_histogram()
    calls = 0
    start = time.perf_counter_ns()
    stop = start + int(seconds * 1e9)
    now = start
    while now < stop:
        session.run(outputs, feeds)
        end = time.perf_counter_ns()
        record_ns(histogram, end - now)
        calls += 1
        now = end
    elapsed_s = (now - start) / 1e9
    return DirectResult(
        calls=calls,
        elapsed_s=round(elapsed_s, 3),
        calls_per_s=round(calls / elapsed_s, 1),
        us_per_call=round(elapsed_s * 1e6 / calls, 2),
        latency=Latency.of(histogram),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="time onnxruntime session.run on the benchmark MLP")
    parser.add_argument("--model-repository", type=Path, help="default: build the MLP in a temporary directory")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--cpu", type=parse_cpus, help="pin to these CPUs, e.g. 0")
    args = parser.parse_args(argv)
    repository = args.model_repository or build_repository()
    print(json.dumps(measure(model_path(repository), args.seconds, args.cpu).to_dict(), indent=2))


if __name__ == "__main__":
    main()
