"""Standard clients work unchanged: tritonclient.grpc infers, reads metadata, config, readiness."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from conftest import GatewayProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from models import DTYPES

from gateway import protocol
from gateway.protocol import inference as pb


@pytest.fixture
def client(gateway: GatewayProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(gateway.address)


def _direct(repository: Path, model: str, version: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(repository / model / version / "model.onnx"))
    return session.run(None, feeds)  # type: ignore[no-any-return]


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("version", ["1", "2"])
def test_mlp_matches_onnxruntime(
    client: triton.InferenceServerClient, repository: Path, batch: int, version: str
) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 32)).astype(np.float32)
    result = client.infer("mlp", [_input("input", x, "FP32")], model_version=version, request_id=f"r-{batch}")
    expected = _direct(repository, "mlp", version, {"input": x})[0]
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert response.model_version == version
    assert response.id == f"r-{batch}"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_dtype_round_trips(client: triton.InferenceServerClient, dtype: str) -> None:
    numpy_type = DTYPES[dtype][1]
    x = (np.arange(12).reshape(3, 4) % 2 == 0) if dtype == "BOOL" else np.arange(12).reshape(3, 4).astype(numpy_type)
    result = client.infer(f"identity_{dtype.lower()}", [_input("x", x, dtype)])
    out = result.as_numpy("y")
    assert out.dtype == numpy_type
    np.testing.assert_array_equal(out, x)


def test_default_version_is_the_highest(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, 32), dtype=np.float32)
    assert client.infer("mlp", [_input("input", x, "FP32")]).get_response().model_version == "2"


def test_output_subset(client: triton.InferenceServerClient) -> None:
    x = np.ones((2, 4), dtype=np.float32)
    result = client.infer("two_outputs", [_input("x", x, "FP32")], outputs=[triton.InferRequestedOutput("times_two")])
    assert [o.name for o in result.get_response().outputs] == ["times_two"]
    np.testing.assert_array_equal(result.as_numpy("times_two"), x * 2)
    assert result.as_numpy("plus_one") is None


def test_typed_contents_are_accepted(stub: object) -> None:
    request = pb.ModelInferRequest(model_name="two_outputs")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    response = stub.ModelInfer(request)  # type: ignore[attr-defined]
    plus_one = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    np.testing.assert_array_equal(plus_one, [2.0, 3.0, 4.0, 5.0])


def test_variable_trailing_dimension(client: triton.InferenceServerClient) -> None:
    for width in (1, 7, 33):
        x = np.full((2, width), width, dtype=np.float32)
        np.testing.assert_array_equal(client.infer("sequence", [_input("x", x, "FP32")]).as_numpy("y"), x)


def test_fixed_shape_model_is_not_batched(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("fixed").config
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [2, 3]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(client.infer("fixed", [_input("x", x, "FP32")]).as_numpy("y"), x)


def test_metadata_and_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp", "1")
    server = client.get_server_metadata()
    assert server.name == "canary-gateway"
    assert "model_configuration" in server.extensions
    metadata = client.get_model_metadata("mlp")
    assert list(metadata.versions) == ["1", "2"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 32])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("output", "FP32", [-1, 16])]


def test_model_config_carries_provenance(client: triton.InferenceServerClient, repository: Path) -> None:
    config = client.get_model_config("mlp", "1").config
    assert config.max_batch_size == 8
    assert list(config.input[0].dims) == [32]
    assert config.input[0].data_type == 11  # TYPE_FP32
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["provenance.training_commit"] == "abc123"
    assert params["metrics.auc"] == "0.91"
    import hashlib

    assert params["sha256"] == hashlib.sha256((repository / "mlp/1/model.onnx").read_bytes()).hexdigest()


def test_statistics_count_inferences(client: triton.InferenceServerClient) -> None:
    before = client.get_inference_statistics("identity_int32", "1").model_stats[0].inference_count
    x = np.ones((5, 4), dtype=np.int32)
    client.infer("identity_int32", [_input("x", x, "INT32")])
    stats = client.get_inference_statistics("identity_int32", "1").model_stats[0]
    assert stats.inference_count == before + 5
    assert stats.inference_stats.success.count >= 1


def test_health_and_reflection(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(reflection.ServerReflectionInfo(iter([request]))))
        names = {s.name for s in reply.list_services_response.service}
        assert "inference.GRPCInferenceService" in names
        assert "grpc.health.v1.Health" in names


class _Live:
    """Answers two RPCs of the inference service (the others are registered too, and unused here)."""

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return pb.ModelInferResponse(id=request.id)

    def __getattr__(self, name: str) -> Any:
        async def unimplemented(request: Any, context: Any) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, name)

        return unimplemented


def test_only_hot_rpcs_are_registered_with_the_core_and_all_answer() -> None:
    """grpc.aio's accept loop waits on one future per core-registered RPC for every call, so the
    gateway registers only its request path; every other RPC must still answer by name lookup."""

    async def run() -> tuple[list[tuple[str, list[str]]], bool, str]:
        server = grpc.aio.server()
        registered: list[tuple[str, list[str]]] = []
        register = server.add_registered_method_handlers

        def recording(service: str, handlers: dict[str, Any]) -> None:
            registered.append((service, sorted(handlers)))
            register(service, handlers)

        server.add_registered_method_handlers = recording  # type: ignore[method-assign]
        protocol.add_service(server, protocol.inference.GRPCInferenceService, _Live(), hot=("ModelInfer",))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = protocol.Stub(channel)
                live = (await stub.ServerLive(pb.ServerLiveRequest())).live
                answered = (await stub.ModelInfer(pb.ModelInferRequest(id="hot"))).id
        finally:
            await server.stop(None)
        return registered, live, answered

    registered, live, answered = asyncio.run(run())
    assert registered == [("inference.GRPCInferenceService", ["ModelInfer"])]
    assert live is True
    assert answered == "hot"
