"""`canary-gateway status` and `canary-gateway drift` against a real gateway with a profiled model:
shifted traffic raises the drift alert (logged, in the admin API and the CLI), normal traffic clears it,
and the status table reports what was sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from models import mlp_graph, save_model
from test_admin_cli import as_json, ok

from gateway.ood.profile import PROFILE_FILE, build_profile, save_profile
from gateway.protocol import Stub
from gateway.protocol import inference as pb
from gateway.stats import RecentRequests, bucket_upper_ns, latency_bucket

FEATURES = 32
CONFIG = """
[ood]
drift_window_rows = 400
drift_min_rows = 200
drift_check_interval_s = 0.1
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    repo = tmp_path_factory.mktemp("drift-models")
    training = np.random.default_rng(0).standard_normal((3000, FEATURES)).astype(np.float32)
    for version in ("1", "2"):
        path = save_model(repo, "scored", version, mlp_graph(seed=int(version)))
        if version == "2":
            save_profile(build_profile(training), path / PROFILE_FILE)
    process = GatewayProcess(repo, CONFIG, tmp_path_factory.mktemp("drift-gateway"))
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log


def _send(gateway: GatewayProcess, rows: np.ndarray, version: str = "2", batch: int = 50) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        stub = Stub(channel)
        for start in range(0, len(rows), batch):
            x = np.ascontiguousarray(rows[start : start + batch], dtype=np.float32)
            request = pb.ModelInferRequest(model_name="scored", model_version=version)
            request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
            request.raw_input_contents.append(x.tobytes())
            stub.ModelInfer(request, timeout=10)


def _drift(gateway: GatewayProcess) -> dict[str, Any]:
    versions = as_json(gateway, "drift", "scored")["versions"]
    assert [v["version"] for v in versions] == ["1", "2"] and versions[0] == {"version": "1", "has_profile": False}
    return dict(versions[1])


def _wait_alert(gateway: GatewayProcess, on: bool) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        drift = _drift(gateway)
        if drift["alert"] == on:
            return drift
        time.sleep(0.1)
    raise AssertionError(f"drift alert did not turn {'on' if on else 'off'}: {drift}")


def test_shifted_traffic_raises_the_drift_alert_and_normal_traffic_clears_it(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    _send(gateway, rng.standard_normal((400, FEATURES)))
    time.sleep(0.3)
    calm = _drift(gateway)
    assert calm["window_rows"] == 400 and not calm["alert"]
    assert not any(f["drifting"] for f in calm["features"])
    assert max(f["psi"] for f in calm["features"]) < 0.2

    shifted = rng.standard_normal((400, FEATURES))
    shifted[:, [2, 9]] += 1.5  # two features move by 1.5 std
    _send(gateway, shifted)
    alarmed = _wait_alert(gateway, on=True)
    drifting = {f["name"] for f in alarmed["features"] if f["drifting"]}
    assert drifting == {"x2", "x9"}
    assert "drift alert: model scored version 2: 2 features drifted" in gateway.log

    text = ok(gateway, "drift", "scored", "--plot", str(tmp_path / "drift.png"))
    assert "drift alert ON" in text and "DRIFTING" in text
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no OOD profile (served unscored)" in text

    _send(gateway, rng.standard_normal((400, FEATURES)))
    _wait_alert(gateway, on=False)
    assert "drift alert cleared: model scored version 2" in gateway.log


def test_status_reports_traffic_per_version_and_role(gateway: GatewayProcess) -> None:
    _send(gateway, np.zeros((20, FEATURES)), version="1", batch=1)
    odd = np.full((5, FEATURES), 9.0)
    _send(gateway, odd, version="2", batch=1)
    (model,) = as_json(gateway, "status", "scored", "--window", "30")["models"]
    assert model["ood_policy"] == "flag"
    versions = {v["version"]: v for v in model["versions"]}
    assert versions["1"]["has_profile"] is False and versions["2"]["has_profile"] is True
    assert versions["1"]["state"] == "READY"
    traffic = {(t["version"], t["role"]): t for t in model["traffic"]}
    v1 = traffic[("1", "primary")]
    assert v1["requests"] >= 20 and v1["scored"] == 0 and v1["error_rate"] == 0
    assert 0 < v1["p50_ms"] <= v1["p99_ms"]
    v2 = traffic[("2", "primary")]
    assert v2["scored"] == v2["requests"] and v2["ood_rate"] >= 5 / v2["requests"]
    table = ok(gateway, "status")
    assert "scored: split highest version" in table and "REQ/S" in table


def test_status_latency_quantiles_are_of_answered_requests_in_one_process_as_with_workers() -> None:
    """Fast refusals do not pull the one-process P50 down: it reads the answered requests, as the
    histogram behind the worker board and a rollout's gates does, with the same rank, ceil(q * n)."""
    recent = RecentRequests()
    now = time.time_ns()
    for ms in (1, 2, 3):
        recent.add(now, ms * 1_000_000, True, None)
    for _ in range(10):
        recent.add(now, 10_000, False, None)  # 0.01 ms refusals
    one_process = recent.summary(now, 60.0)
    assert one_process.requests == 13 and one_process.error_rate == 10 / 13
    assert (one_process.p50_ms, one_process.p99_ms) == (2.0, 3.0)
    workers = recent.counts().summary(60.0)  # the same figures, read as histogram bucket upper bounds
    assert workers.p50_ms == bucket_upper_ns(latency_bucket(2_000_000)) / 1e6
    assert workers.p99_ms == bucket_upper_ns(latency_bucket(3_000_000)) / 1e6

    refused = RecentRequests()
    refused.add(now, 10_000, False, None)
    only_failures = refused.summary(now, 60.0)
    assert only_failures.requests == 1 and only_failures.p50_ms == only_failures.p99_ms == 0.0
    assert refused.counts().summary(60.0)[3:5] == (0.0, 0.0)
