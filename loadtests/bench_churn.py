"""Model versions loaded and unloaded under load: does serving notice? (issue #11's figure)

One gateway (pinned like bench_core: server on one CPU, load generator on another) serves `mlp`
version 1 through a 100% route. The same closed-loop load runs twice: steady, then while another
thread loads and unloads version 2 through the admin API `--changes` times (each load runs session
creation and warm-up in the gateway's worker thread, then publishes; each unload withdraws the version,
waits for its requests and frees it). Printed: throughput, p50/p99 of both phases, the p99 ratio
(target <= 1.5) and failed requests (target 0). `--rounds N` repeats both phases and reports medians.

    python loadtests/bench_churn.py [--duration 8] [--concurrency 8] [--changes 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_core import choose_placement, gateway_argv, running
from loadgen import LoadResult, LoadSpec, run_load
from models import MODEL_NAME, VersionedOutputCheck, build_infer_request, build_repository

from gateway.protocol import Stub, admin

TARGET_P99_RATIO = 1.5
REASON = "bench_churn"


def churn(address: str, token: str, changes: int, spread_s: float, failures: list[str]) -> None:
    """Load and unload version 2, `changes` operations spread over `spread_s` seconds."""
    import grpc

    metadata = [("authorization", f"Bearer {token}")]
    pause = spread_s / max(changes, 1)
    with grpc.insecure_channel(address) as channel:
        ops = Stub(channel, admin.AdminService)
        for i in range(changes):
            time.sleep(pause)
            try:
                if i % 2 == 0:
                    ops.LoadModel(
                        admin.LoadModelRequest(model=MODEL_NAME, version="2", reason=REASON), metadata=metadata
                    )
                else:
                    request = admin.UnloadModelRequest(model=MODEL_NAME, version="2", reason=REASON)
                    ops.UnloadModel(request, metadata=metadata)
            except grpc.RpcError as e:
                failures.append(f"change {i}: {e.code().name}: {e.details()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--changes", type=int, default=20, help="loads + unloads during the churn phase")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    placement = choose_placement()
    workdir = Path(tempfile.mkdtemp(prefix="bench-churn-"))
    repository = build_repository(workdir / "models", ("1", "2"))
    config = workdir / "gateway.toml"
    config.write_text("[repository]\nwatch_interval_s = 0\n")
    state = workdir / "state"
    command = gateway_argv(repository)
    command += ["--state-dir", str(state), "--config", str(config)]
    body = build_infer_request()
    print(f"placement: {placement.description}; work directory {workdir}", flush=True)
    steady: list[LoadResult] = []
    churned: list[LoadResult] = []
    change_failures: list[str] = []
    with running("gateway", command, placement, workdir) as server:
        server.wait_ready(body, VersionedOutputCheck(("1", "2")))
        token = (state / "admin.token").read_text().strip()
        metadata = [("authorization", f"Bearer {token}")]
        ops = Stub(server.channel, admin.AdminService)
        split = [admin.VersionShare(version="1", bps=10000)]
        ops.SetSplit(admin.SetSplitRequest(model=MODEL_NAME, split=split, reason=REASON), metadata=metadata)
        ops.UnloadModel(admin.UnloadModelRequest(model=MODEL_NAME, version="2", reason=REASON), metadata=metadata)
        spec = LoadSpec(
            target=server.target,
            body=body,
            concurrency=args.concurrency,
            duration_s=args.duration,
            warmup_s=1.0,
            cpus=placement.client_cpus,
        )
        for number in range(1, args.rounds + 1):
            steady.append(run_load(spec))
            worker = threading.Thread(
                target=churn, args=(server.target, token, args.changes, args.duration, change_failures)
            )
            worker.start()  # the changes start after the load's warm-up second
            churned.append(run_load(spec))
            worker.join()
            if args.changes % 2:  # leave version 2 unloaded for the next round
                ops.UnloadModel(
                    admin.UnloadModelRequest(model=MODEL_NAME, version="2", reason=REASON), metadata=metadata
                )
            print(
                f"round {number}: steady p99 {steady[-1].latency.p99_us} us, churn p99 {churned[-1].latency.p99_us} us"
            )

    def med(results: list[LoadResult], pick: str) -> float:
        return statistics.median(
            getattr(r.latency, pick) if pick.endswith("_us") else getattr(r, pick) for r in results
        )

    failed = sum(sum(r.errors.values()) for r in churned + steady)
    print(f"\n{'phase':<8} {'req/s':>8} {'p50 us':>8} {'p99 us':>8} {'errors':>7}")
    for name, results in (("steady", steady), ("churn", churned)):
        errors = sum(sum(r.errors.values()) for r in results)
        figures = (med(results, "throughput"), med(results, "p50_us"), med(results, "p99_us"))
        print(f"{name:<8} " + " ".join(f"{value:>8.0f}" for value in figures) + f" {errors:>7}")
    ratio = statistics.median(c.latency.p99_us / s.latency.p99_us for s, c in zip(steady, churned, strict=True))
    print(f"\n{args.changes} loads/unloads per churn phase; change failures: {change_failures or 'none'}")
    verdict = "met" if ratio <= TARGET_P99_RATIO and failed == 0 and not change_failures else "MISSED"
    print(f"churn p99 / steady p99: {ratio:.2f} (target <= {TARGET_P99_RATIO}), failed requests {failed}: {verdict}")
    return 0 if verdict == "met" else 1


if __name__ == "__main__":
    sys.exit(main())
