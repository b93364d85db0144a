"""Blast radius of a bad rollout: how many user requests reach a bad candidate before the gateway rolls
it back, as a share of all requests sent while the rollout ran (the target is under 2%).

For each bad candidate (one that fails on some inputs, one 5x+ slower, one that disagrees with the
baseline) a gateway serves version 1 (an FP32 identity) and a rollout of version 2 starts with steps
1,5,25,50,100 while a client thread sends requests at a fixed rate; the script waits for the rollback
and counts the requests answered by (or failed on) version 2. Each candidate runs twice: straight into
the 1% step, and with a shadow phase first (where users never see the candidate).

    python loadtests/bench_rollout.py [--rate 200] [--min-requests 30] [--bad-share 0.1]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np

from gateway.protocol import Stub, admin
from gateway.protocol import inference as pb

ROOT = Path(__file__).resolve().parent.parent


def _test_models() -> ModuleType:
    """tests/models.py (its name clashes with loadtests/models.py, so it is loaded by path)."""
    spec = importlib.util.spec_from_file_location("test_models", ROOT / "tests" / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Load(threading.Thread):
    """Requests at a fixed rate; records (send time, answering version or None, failed)."""

    def __init__(self, address: str, model: str, rate: float, bad_share: float) -> None:
        super().__init__(daemon=True)
        self.address, self.model, self.rate, self.bad_share = address, model, rate, bad_share
        self.sent: list[tuple[float, str | None, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(self.address) as channel:
            stub = Stub(channel)
            next_at = time.monotonic()
            while not self.stop.is_set():
                x = rng.uniform(0, 4, (1, 64)).astype(np.float32)
                if rng.random() < self.bad_share:
                    x[0, 0] = 6.0  # failing_graph fails on a value of 5 or more
                request = pb.ModelInferRequest(model_name=self.model)
                request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
                request.raw_input_contents.append(x.tobytes())
                sent = time.time()
                try:
                    self.sent.append((sent, stub.ModelInfer(request, timeout=10).model_version, False))
                except grpc.RpcError as e:
                    # Only the bad candidate fails (the baseline is an identity): it reached version 2.
                    self.sent.append((sent, "2" if "model execution failed" in (e.details() or "") else None, True))
                next_at += 1 / self.rate
                time.sleep(max(0.0, next_at - time.monotonic()))


def start_gateway(repository: Path, state: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "gateway", "serve", "--workers", "1", "--model-repository", str(repository)]
    process = subprocess.Popen([*command, "--port", "0", "--state-dir", str(state)], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"listening on ([\d.]+:\d+)", line)
        if match:
            address = match.group(1)
            break
    else:
        raise RuntimeError("the gateway did not start")
    threading.Thread(target=lambda: [None for _ in process.stderr or ()], daemon=True).start()  # drain its log
    with grpc.insecure_channel(address) as channel:
        deadline = time.monotonic() + 60
        while not Stub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not become ready")
            time.sleep(0.1)
    return process, address


def run_one(address: str, token: str, model: str, shadow_first: bool, args: argparse.Namespace) -> tuple[str, ...]:
    with grpc.insecure_channel(address) as channel:
        ops = Stub(channel, admin.AdminService)
        metadata = [("authorization", f"Bearer {token}")]
        ops.Promote(admin.PromoteRequest(model=model, version="1", reason="baseline"), metadata=metadata)
        load = Load(address, model, args.rate, args.bad_share if model == "errs" else 0.0)
        load.start()
        time.sleep(1.0)  # the baseline's window starts with traffic already flowing
        began = time.time()
        request = admin.StartRolloutRequest(
            model=model,
            candidate="2",
            steps_bps=[100, 500, 2500, 5000, 10000],
            interval_s=60.0,
            shadow_requests=args.shadow_requests if shadow_first else 0,
            gates=admin.RolloutGates(min_requests=args.min_requests),
            reason="bench_rollout",
        )
        ops.StartRollout(request, metadata=metadata)
        while True:
            rollout = ops.GetRollout(admin.GetRolloutRequest(model=model), metadata=metadata).rollout
            if rollout.state != "running" or time.time() - began > 300:
                break
            time.sleep(0.1)
        ended = rollout.history[-1].ended_ns / 1e9 if rollout.history else time.time()
        time.sleep(1.0)
        load.stop.set()
        load.join()
    during = [s for s in load.sent if began <= s[0] < ended]
    reached = sum(version == "2" for _, version, _ in during)
    after = sum(version == "2" for t, version, _ in load.sent if t >= ended + 0.1)
    failed = sum(bad for _, _, bad in during)
    gate = rollout.outcome.split(":")[1].strip() if rollout.state == "failed" else rollout.state
    share = reached / len(during) if during else 0.0
    return (
        model,
        "shadow phase first" if shadow_first else "steps from 1%",
        gate,
        f"{ended - began:.1f}",
        str(len(during)),
        str(reached),
        f"{share:.2%}",
        str(failed),
        str(after),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--min-requests", type=int, default=30, help="per side before a decision (default 30)")
    parser.add_argument("--bad-share", type=float, default=0.1, help="share of inputs the failing candidate fails on")
    parser.add_argument("--shadow-requests", type=int, default=100, help="length of the shadow phase (default 100)")
    args = parser.parse_args()
    models = _test_models()
    candidates = {
        "errs": models.failing_graph(),
        "slow": models.slow_identity_graph(),
        "disagrees": models.scaled_graph(1.5),
    }
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "models"
        for name, graph in candidates.items():
            models.save_model(repository, name, "1", models.identity_graph("FP32", width=64))
            models.save_model(repository, name, "2", graph)
        process, address = start_gateway(repository, Path(tmp) / "state")
        try:
            token = (Path(tmp) / "state" / "admin.token").read_text().strip()
            rows = [
                run_one(address, token, model, shadow_first, args)
                for model in candidates
                for shadow_first in (False, True)
            ]
        finally:
            process.terminate()
            process.wait(30)
    headers = ("candidate", "variant", "failed gate", "s to rollback", "requests", "to v2", "share", "failed", "after")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"rate {args.rate:g} req/s, min_requests {args.min_requests}, steps 1,5,25,50,100, interval 60 s")
    for row in (headers, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
