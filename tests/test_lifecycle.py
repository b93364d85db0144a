"""Readiness waits for warm-up; SIGTERM drains in-flight calls and exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from models import build_heavy_repository

from gateway.protocol import Stub
from gateway.protocol import inference as pb


@pytest.fixture(scope="module")
def heavy_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_heavy_repository(tmp_path_factory.mktemp("heavy"))


def test_not_ready_until_warm_up_ends(heavy_repository: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(heavy_repository, "[repository]\nwarmup_runs = 400\n", tmp_path)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest()).live
            assert not stub.ServerReady(pb.ServerReadyRequest()).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="heavy")).ready
            status = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            request = pb.ModelInferRequest(model_name="heavy")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(np.zeros((1, 64), dtype=np.float32).tobytes())
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "LOADING" in error.value.details()
            gateway.wait_ready()
            assert stub.ModelReady(pb.ModelReadyRequest(name="heavy")).ready
            # A version whose warm-up fails is reported and never served; the gateway runs on.
            assert not stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready
            assert "model broken version 1 failed to load" in gateway.log
            broken = pb.ModelInferRequest(model_name="broken")
            broken.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            broken.raw_input_contents.append(bytes(16))
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(broken)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "FAILED" in error.value.details()
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert stub.ModelInfer(request).model_version == "1"
    finally:
        assert gateway.stop() == 0


async def _load_then_terminate(gateway: GatewayProcess, count: int) -> list[object]:
    request = pb.ModelInferRequest(model_name="heavy")
    request.inputs.add(name="x", datatype="FP32", shape=[64, 64])
    request.raw_input_contents.append(np.ones((64, 64), dtype=np.float32).tobytes())
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = Stub(channel)
        await stub.ModelInfer(request, timeout=60)  # a warm connection and arena, so dispatch is quick
        calls = [asyncio.ensure_future(stub.ModelInfer(request, timeout=60)) for _ in range(count)]
        # Every call reaches a handler within milliseconds and then waits for the one model thread;
        # calls the transport holds but no handler has started yet are not in flight and would be cancelled.
        await asyncio.sleep(0.5)
        assert not any(c.done() for c in calls[-4:]), "calls finished before SIGTERM; make the model slower"
        gateway.process.send_signal(signal.SIGTERM)
        return await asyncio.gather(*calls, return_exceptions=True)


def test_sigterm_finishes_in_flight_calls_and_exits_zero(heavy_repository: Path, tmp_path: Path) -> None:
    config = '[models.heavy]\nexecution = "thread"\nmax_batch_size = 64\n'
    gateway = GatewayProcess(heavy_repository, config, tmp_path)
    gateway.wait_ready()
    started = time.monotonic()
    results = asyncio.run(_load_then_terminate(gateway, 100))
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(r.model_version == "1" for r in results)  # type: ignore[union-attr]
    assert gateway.process.wait(30) == 0, gateway.log
    assert "draining" in gateway.log and "stopped" in gateway.log
    assert time.monotonic() - started < 30
    with grpc.insecure_channel(gateway.address) as channel:  # the port is closed
        with pytest.raises(grpc.RpcError):
            Stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=1)
