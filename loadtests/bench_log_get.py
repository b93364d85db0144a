"""`log get ID` on a large log: build N records with the gateway's own writer, then time lookups
by request id (the reader's by_id index) for random ids, and one `canary-gateway log get` process.

    python loadtests/bench_log_get.py --records 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.config import LogConfig
from gateway.requestlog.reader import LogReader
from gateway.requestlog.record import Record, Tensor
from gateway.requestlog.writer import LogWriter

FEATURES = bytes(32 * 4)  # one FP32 row of the benchmark MLP


async def build(log_dir: Path, count: int, chunk: int = 2000) -> float:
    writer = LogWriter(log_dir, LogConfig())
    start = time.perf_counter()
    for first in range(0, count, chunk):
        records = [
            Record(f"req-{i}", time.time_ns(), "mlp", "1", inputs=[Tensor("input", "FP32", [1, 32], FEATURES)])
            for i in range(first, min(first + chunk, count))
        ]
        await asyncio.gather(*(writer.commit(r) for r in records))
    await writer.close()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp) / "log"
        seconds = asyncio.run(build(log_dir, args.records))
        print(f"wrote {args.records} records in {seconds:.1f}s ({args.records / seconds:,.0f} records/s)")
        reader = LogReader(log_dir)
        ids = [f"req-{random.randrange(args.records)}" for _ in range(args.lookups)]
        times_ms = []
        for request_id in ids:
            start = time.perf_counter()
            [record] = reader.get(request_id)
            times_ms.append((time.perf_counter() - start) * 1000)
            assert record.id == request_id
        times_ms.sort()
        p50, p99 = statistics.median(times_ms), times_ms[int(len(times_ms) * 0.99)]
        print(f"get by id, {args.lookups} random ids: p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {times_ms[-1]:.3f} ms")
        start = time.perf_counter()
        command = [sys.executable, "-m", "gateway", "log", "--log-dir", str(log_dir), "get", ids[0]]
        subprocess.run(command, check=True, capture_output=True)
        wall = (time.perf_counter() - start) * 1000
        print(f"`canary-gateway log get` as a process: {wall:.0f} ms wall (mostly Python start-up and imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
