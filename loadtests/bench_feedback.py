"""Ground-truth ingest beside inference: feedback records per second in batches, and inference throughput
with and without feedback arriving, in one run (targets: >= 50,000 records/s; >= 0.95x throughput).

The gateway (pinned to one CPU, the load generator and the feedback sender to the other) serves the
benchmark MLP. A set of requests with known ids is logged first; the feedback sender then sends
`SubmitFeedback` batches of truth for them (each id again and again, so every record after the first
round is an overwrite: the same checks, log lookups and writes). Inference then runs in short windows,
alternately alone and with feedback arriving at `--rate` records/s (open loop, one batch every
batch/rate seconds), in ABBA order: on this shared host the machine drifts by more than the 5% asked
about within a minute, so phases run one after the other would measure the drift. The verdict is the
median of the per-pair throughput ratios. Last, feedback alone as fast as it goes.

The gateway's feedback ingest process runs at SCHED_IDLE off the gateway's pinned CPU by default
(`feedback.ingest_cpus = "spare"`): here, on what the load generator leaves idle. `--ingest-cpus gateway`
keeps it on the gateway's CPU, where it only gets what serving leaves.

    python loadtests/bench_feedback.py [--pairs 10] [--window 3] [--rate 50000] [--batch 5000]
                                       [--concurrency 16] [--duration 8] [--ingest-cpus spare|gateway]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
from abba import abba, quartiles
from bench_core import choose_placement, gateway_argv, running
from loadgen import LoadSpec, run_load
from models import INPUT_NAME, MODEL_NAME, OutputCheck, build_infer_request, build_repository, sample_input

from gateway.protocol import admin as apb
from gateway.protocol import inference as pb

SUBMIT = "/canary.admin.v1.AdminService/SubmitFeedback"


def _log_known_ids(target: str, count: int) -> list[str]:
    """Send `count` requests with ids fb-<n> (16 at a time), so their truth has records to join."""
    x = sample_input(1)

    async def send() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            queue = iter(range(count))

            async def caller() -> None:
                for n in queue:
                    request = pb.ModelInferRequest(model_name=MODEL_NAME, id=f"fb-{n}")
                    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=x.shape)
                    request.raw_input_contents.append(x.tobytes())
                    await call(request.SerializeToString(), timeout=10)

            await asyncio.gather(*(caller() for _ in range(16)))

    asyncio.run(send())
    return [f"fb-{n}" for n in range(count)]


class FeedbackSender(threading.Thread):
    """Pre-serialized SubmitFeedback batches at `rate` records/s (0: as fast as answers come)."""

    def __init__(self, target: str, token: str, ids: list[str], batch: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.batches = []
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            columns = apb.FeedbackColumns(request_ids=chunk, values=[float(n % 7) for n in range(len(chunk))])
            self.batches.append(apb.SubmitFeedbackRequest(model=MODEL_NAME, columns=columns).SerializeToString())
        self.target, self.metadata, self.batch, self.rate = target, [("authorization", f"Bearer {token}")], batch, rate
        self.stored = 0
        self.problems = 0
        self.first_problem = ""
        self.elapsed_s = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            submit = channel.unary_unary(SUBMIT)
            started = next_at = time.monotonic()
            n = 0
            while not self.stop.is_set():
                if self.rate:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    next_at += self.batch / self.rate
                answer = apb.SubmitFeedbackResponse.FromString(
                    submit(self.batches[n % len(self.batches)], metadata=self.metadata, timeout=30)
                )
                self.stored += answer.stored
                refused = len(answer.unknown_ids) + len(answer.invalid)
                if refused and not self.problems:  # the first refusal says why
                    self.first_problem = (
                        f"unknown id {answer.unknown_ids[0]!r}" if answer.unknown_ids else answer.invalid[0].reason
                    )
                self.problems += refused
                n += 1
            self.elapsed_s = time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10, help="window pairs, ABBA order (default 10)")
    parser.add_argument("--window", type=float, default=3.0, help="measured seconds per window (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="load before each window, not measured")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of feedback alone (default 8)")
    parser.add_argument("--rate", type=float, default=50_000, help="feedback records/s offered (default 50000)")
    parser.add_argument("--batch", type=int, default=5000, help="records per SubmitFeedback call (default 5000)")
    parser.add_argument("--ids", type=int, default=20_000, help="logged requests the truth is for (default 20000)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--ingest-cpus", choices=("spare", "gateway"), default="spare", help="feedback.ingest_cpus (default spare)"
    )
    args = parser.parse_args(argv)
    placement = choose_placement()
    print(f"placement: {placement.description}; feedback ingest on {args.ingest_cpus} CPU", flush=True)
    if placement.client_cpus is not None:  # the feedback sender is a client: keep it off the server's CPU
        os.sched_setaffinity(0, placement.client_cpus)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        repository = build_repository(workdir / "models")
        argv_ = gateway_argv(repository)
        config = workdir / "gateway.toml"
        config.write_text(f'[feedback]\ningest_cpus = "{args.ingest_cpus}"\n')
        argv_ += ["--state-dir", str(workdir / "state"), "--config", str(config)]
        with running("gateway", argv_, placement, workdir) as server:
            body = build_infer_request()
            server.wait_ready(body, OutputCheck())
            token = (workdir / "state" / "admin.token").read_text().strip()
            ids = _log_known_ids(server.target, args.ids)
            spec = LoadSpec(
                server.target,
                body,
                concurrency=args.concurrency,
                duration_s=args.window,
                warmup_s=args.warmup,
                cpus=placement.client_cpus,
            )

            def window(with_feedback: bool) -> tuple[float, float]:
                """(inferences/s, feedback records stored per second) of one window."""
                sender = FeedbackSender(server.target, token, ids, args.batch, args.rate) if with_feedback else None
                if sender is not None:
                    sender.start()
                result = run_load(spec)
                if sender is None:
                    return result.throughput, 0.0
                sender.stop.set()
                sender.join()
                if sender.problems:
                    raise RuntimeError(
                        f"{sender.problems} feedback records refused in a window, the first: {sender.first_problem}"
                    )
                return result.throughput, sender.stored / sender.elapsed_s

            ratios, rates = [], []
            for number, order in abba(args.pairs, False, True):
                figures = {mode: window(mode) for mode in order}
                (alone, _), (loaded, rate) = figures[False], figures[True]
                ratios.append(loaded / alone)
                rates.append(rate)
                print(
                    f"pair {number:3}: alone {alone:6,.0f} inferences/s   with feedback {loaded:6,.0f} inferences/s "
                    f"and {rate:7,.0f} records/s   ratio {loaded / alone:.3f}",
                    flush=True,
                )
            low, median, high = quartiles(ratios)
            print(
                f"\nwith / without feedback, inference throughput at c{args.concurrency}, {len(ratios)} pairs: "
                f"median {median:.3f} (target >= 0.95: {'met' if median >= 0.95 else 'missed'}); "
                f"quartiles {low:.3f} .. {high:.3f}\n"
                f"feedback stored meanwhile: median {statistics.median(rates):,.0f} records/s "
                f"(offered {args.rate:,.0f}/s; target >= 50,000)"
            )
            sender = FeedbackSender(server.target, token, ids, args.batch, 0.0)
            sender.start()
            time.sleep(args.duration)
            sender.stop.set()
            sender.join()
            print(
                f"feedback alone, as fast as it goes: {sender.stored / sender.elapsed_s:,.0f} records/s "
                f"in batches of {args.batch} ({sender.problems} refused)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
