"""Concurrent requests are micro-batched into shared onnxruntime runs, and each caller still gets
exactly its own rows back; one bad request in a batch fails alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import GatewayProcess

from gateway.protocol import Stub
from gateway.protocol import inference as pb


def _request(model: str, name: str, array: np.ndarray, datatype: str, request_id: str) -> object:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    request.raw_input_contents.append(array.tobytes())
    return request


async def _send_all(address: str, requests: list[object]) -> list[object]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)
        return await asyncio.gather(*(stub.ModelInfer(r) for r in requests), return_exceptions=True)


def _statistics(gateway: GatewayProcess, model: str) -> object:
    with grpc.insecure_channel(gateway.address) as channel:
        return Stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model, version="1")).model_stats[0]


async def _closed_loop(address: str, model: str, width: int, seconds: float) -> list[tuple[np.ndarray, object]]:
    """16 callers, each sending its next request as soon as the last is answered; returns
    (input, response) pairs, checked afterwards so the client keeps up with the server."""
    rng = np.random.default_rng(7)
    exchanges: list[tuple[np.ndarray, object]] = []

    async def worker(stub: Stub) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            x = rng.standard_normal((int(rng.integers(1, 4)), width)).astype(np.float32)
            request = _request(model, "input" if model == "mlp" else "x", x, "FP32", f"r{len(exchanges)}")
            request.model_version = "1"  # type: ignore[attr-defined]
            exchanges.append((x, await stub.ModelInfer(request)))

    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)
        await asyncio.gather(*(worker(stub) for _ in range(16)))
    return exchanges


@pytest.mark.parametrize(
    ("model", "width", "out_width", "must_batch"),
    # Inline batching depends on how fast this one Python client can send; the in-process tests in
    # test_batcher.py check the inline policy itself.
    [("mlp", 32, 16, False), ("wide_inline", 64, 64, False), ("wide_thread", 64, 64, True)],
)
def test_concurrent_requests_share_runs_and_get_their_own_rows(
    gateway: GatewayProcess, repository: Path, model: str, width: int, out_width: int, must_batch: bool
) -> None:
    before = _statistics(gateway, model)
    # Longer than the batcher's probe interval, so it notices the concurrency and starts batching.
    exchanges = asyncio.run(_closed_loop(gateway.address, model, width, seconds=1.0))
    after = _statistics(gateway, model)
    session = ort.InferenceSession(str(repository / model / "1/model.onnx"))
    for x, response in exchanges:
        assert response.model_version == "1"  # type: ignore[attr-defined]
        got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)  # type: ignore[attr-defined]
        expected = session.run(None, {session.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got.reshape(x.shape[0], out_width), expected, rtol=1e-4, atol=1e-4)
    runs = after.execution_count - before.execution_count
    assert after.inference_count - before.inference_count == sum(x.shape[0] for x, _ in exchanges)
    if must_batch:
        assert runs < len(exchanges) * 0.8, f"{runs} onnxruntime runs for {len(exchanges)} requests: little batching"


def test_different_trailing_shapes_are_not_mixed(gateway: GatewayProcess) -> None:
    inputs = [np.full((1, 3 + i % 4), i, dtype=np.float32) for i in range(32)]
    responses = asyncio.run(
        _send_all(gateway.address, [_request("sequence", "x", x, "FP32", str(i)) for i, x in enumerate(inputs)])
    )
    for x, response in zip(inputs, responses, strict=True):
        assert list(response.outputs[0].shape) == list(x.shape)
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], dtype=np.float32), x.ravel())


def test_a_failing_request_does_not_fail_its_batch(gateway: GatewayProcess) -> None:
    indices = [np.array([[i % 5]], dtype=np.int64) for i in range(24)]
    indices[11] = np.array([[99]], dtype=np.int64)
    responses = asyncio.run(
        _send_all(gateway.address, [_request("gather", "index", x, "INT64", str(i)) for i, x in enumerate(indices)])
    )
    for i, response in enumerate(responses):
        if i == 11:
            assert isinstance(response, grpc.aio.AioRpcError)
            assert response.code() == grpc.StatusCode.INTERNAL
        else:
            assert not isinstance(response, BaseException), response
            assert np.frombuffer(response.raw_output_contents[0], dtype=np.float32)[0] == (i % 5) * 10


def test_max_batch_size_zero_means_no_batching(repository: Path, tmp_path: Path) -> None:
    """As in Triton: `max_batch_size = 0` serves a batchable model without merging requests and without a
    batch limit, and ModelConfig then reports the whole shape (it used to refuse every request)."""
    gateway = GatewayProcess(repository, "[models.mlp]\nmax_batch_size = 0\n", tmp_path)

    def _version_1(x: np.ndarray, request_id: str) -> object:
        request = _request("mlp", "input", x, "FP32", request_id)
        request.model_version = "1"  # type: ignore[attr-defined]
        return request

    try:
        gateway.wait_ready()
        with grpc.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="mlp", version="1")).config
            big = stub.ModelInfer(_version_1(np.ones((100, 32), np.float32), "big"))
        rng = np.random.default_rng(3)
        inputs = [rng.standard_normal((1, 32)).astype(np.float32) for _ in range(48)]
        replies = asyncio.run(_send_all(gateway.address, [_version_1(x, str(i)) for i, x in enumerate(inputs)]))
        stats = _statistics(gateway, "mlp")
    finally:
        assert gateway.stop() == 0, gateway.log
    assert (config.max_batch_size, list(config.input[0].dims), config.HasField("dynamic_batching")) == (
        0,
        [-1, 32],
        False,
    )
    assert list(big.outputs[0].shape) == [100, 16]
    assert not [r for r in replies if isinstance(r, Exception)]
    assert (stats.inference_count, stats.execution_count) == (100 + 48, 1 + 48)  # rows; runs: none merged
